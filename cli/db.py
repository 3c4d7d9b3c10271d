"""``mlpq db``: schema migrations."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.output import console

app = typer.Typer(
    help="Manage the store's schema (Alembic migrations). Example: $ mlpq db upgrade",
    no_args_is_help=True,
)


@app.command()
def upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Apply the migrations up to REVISION (default: the newest) to MLPQ_DATABASE_URL.

    Example:

        $ mlpq db upgrade
    """
    from service.settings import get_settings
    from service.store import make_engine
    from service.store import upgrade as do_upgrade

    url = get_settings().database_url
    engine = make_engine(url)
    do_upgrade(engine, revision)
    console().print(f"{engine.url.render_as_string(hide_password=True)}: at revision {revision}")


@app.command()
def current() -> None:
    """Print the revision the store is at.

    Example:

        $ mlpq db current
    """
    from service.settings import get_settings
    from service.store import current_revision, make_engine

    engine = make_engine(get_settings().database_url)
    console().print(current_revision(engine) or "empty (no revision)")
