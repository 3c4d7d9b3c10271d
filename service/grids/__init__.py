"""Grids: read a grid file or command-line axes, validate it whole, expand it into runs.

Owns the grid language (``spec``: keys, axes, pydantic sections), resolving it
into run configs (``resolve``: products, zips, samples, exclusions, each config
checked by ``engine.TrainConfig``), the file loader and expander (``loader``) and
the inline form of ``mlpq submit --lr ...`` (``inline``). Knows nothing of the
store or the queue: its output is a ``Grid`` of plain configs and their hashes.
"""

from service._exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        "inline": (
            "flag",
            "inline_grid",
        ),
        "keys": ("TIME_LIMIT_KEY",),
        "loader": (
            "Grid",
            "config_hash",
            "expand_grid",
            "hidden_label",
            "load_grid",
            "parse_grid",
        ),
    },
)
