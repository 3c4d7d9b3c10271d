"""``mlpq db``: schema migrations."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="Manage the store's schema (Alembic migrations).", no_args_is_help=True)


@app.command()
def upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Apply the migrations up to REVISION (default: the newest) to MLPQ_DATABASE_URL."""
    from service.settings import get_settings
    from service.store import make_engine
    from service.store import upgrade as do_upgrade

    url = get_settings().database_url
    engine = make_engine(url)
    do_upgrade(engine, revision)
    Console().print(f"{engine.url.render_as_string(hide_password=True)}: at revision {revision}")


@app.command()
def current() -> None:
    """Print the revision the store is at."""
    from service.settings import get_settings
    from service.store import current_revision, make_engine

    engine = make_engine(get_settings().database_url)
    Console().print(current_revision(engine) or "empty (no revision)")
