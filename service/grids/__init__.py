"""Grids: read a grid file or command-line axes, validate it whole, expand it into runs.

Owns the grid language (``spec``: keys, axes, pydantic sections), resolving it
into run configs (``resolve``: products, zips, samples, exclusions, each config
checked by ``engine.TrainConfig``), the file loader and expander (``loader``) and
the inline form of ``mlpq submit --lr ...`` (``inline``). Knows nothing of the
store or the queue: its output is a ``Grid`` of plain configs and their hashes.
"""

from service.grids.inline import flag, inline_grid
from service.grids.loader import (
    TIME_LIMIT_KEY,
    Grid,
    config_hash,
    expand_grid,
    hidden_label,
    load_grid,
    parse_grid,
)

__all__ = [
    "TIME_LIMIT_KEY",
    "Grid",
    "config_hash",
    "expand_grid",
    "flag",
    "hidden_label",
    "inline_grid",
    "load_grid",
    "parse_grid",
]
