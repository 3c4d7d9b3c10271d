"""Short runs share a message: runs packed by their estimated training time.

A tiny run trains in a few milliseconds, less than its message costs the broker
and the worker; so runs travel in packs whose estimates (``engine.cost``) add up
to about ``pack_seconds``, a long run alone. A message then carries a list of run
ids; the worker claims and finishes each on its own (``worker.tasks.train``), so a
pack redelivered after a kill does only what is left, and one run's failure never
fails its neighbours. A grid that is small overall is still spread over at least
``MIN_MESSAGES`` messages, so every worker process gets a share, but no pack is
made shorter than ``MIN_PACK_SECONDS`` for it: each message costs the worker a few
milliseconds of its own (its delivery, the claim, the window's top-up).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, text

#: A batch of runs is split into at least this many messages when it has the runs.
#: Each message costs the machine about 3 ms of CPU of its own (its delivery, the
#: claim, the commit of its results, the window's top-up): spread over 32 messages,
#: a 500-run grid of tiny runs spent 0.11 ms a run more than over 16 (bench/throughput.py).
MIN_MESSAGES = 16
#: Estimated seconds below which a pack is not split further to make up MIN_MESSAGES.
MIN_PACK_SECONDS = 0.03
#: Run ids whose configs are read per query when the caller gives no costs.
_CONFIG_CHUNK = 5000


def spread_limit(total: float) -> float:
    """Estimated seconds per pack that spreads ``total`` seconds over the workers."""
    return max(total / MIN_MESSAGES, MIN_PACK_SECONDS)


def pack(
    costs: Sequence[tuple[int, float]], target: float, *, spread: bool = True
) -> list[list[int]]:
    """Consecutive runs grouped into packs of estimated seconds up to ``target``.

    ``costs`` is (run id, estimated seconds) in publishing order. A run estimated
    at ``target`` or more travels alone; ``target <= 0`` gives one run per pack,
    in order.
    ``spread``: the runs are all there is to run (off when ``costs`` is the head
    of a longer queue), so a small total is split over at least ``MIN_MESSAGES``
    packs (of at least ``MIN_PACK_SECONDS`` each), and the longest runs go first
    (runs without an estimate count as longest): the workers end together instead
    of one finishing a long run while the others idle. Otherwise the order is kept.
    """
    if target <= 0:
        return [[run_id] for run_id, _ in costs]
    limit = target
    if spread:
        costs = sorted(costs, key=lambda run: -run[1])  # stable: equal costs keep their order
        finite = [c for _, c in costs if c != float("inf")]
        limit = min(target, spread_limit(sum(finite)) if finite else target)
    packs: list[list[int]] = []
    current: list[int] = []
    total = 0.0
    for run_id, cost in costs:
        if current and total + cost > limit:
            packs.append(current)
            current, total = [], 0.0
        current.append(run_id)
        total += cost
    if current:
        packs.append(current)
    return packs


def estimated_costs(
    store: Engine | Connection,
    run_ids: Iterable[int],
    known: Mapping[int, float] | None = None,
) -> list[tuple[int, float]]:
    """(run id, estimated seconds) for ``run_ids``, reading configs not in ``known``.

    ``store``: an engine, or a connection to read on (in its transaction).
    """
    from engine.cost import estimate_seconds

    ids = list(run_ids)
    costs = dict(known or {})
    missing = [i for i in ids if i not in costs]
    sqlite = store.dialect.name == "sqlite"
    query = (
        text("SELECT id, config FROM runs WHERE id IN (SELECT value FROM json_each(:ids))")
        if sqlite
        else text("SELECT id, config FROM runs WHERE id = ANY(CAST(:ids AS integer[]))")
    )
    for start in range(0, len(missing), _CONFIG_CHUNK):
        chunk = missing[start : start + _CONFIG_CHUNK]
        params = {"ids": json.dumps(chunk) if sqlite else chunk}
        if isinstance(store, Connection):
            rows = store.execute(query, params).all()
        else:
            with store.connect() as conn:
                rows = conn.execute(query, params).all()
        for run_id, config in rows:
            try:
                costs[run_id] = estimate_seconds(_mapping(config))
            except (KeyError, TypeError, ValueError, AttributeError):
                costs[run_id] = float("inf")  # not a config we can estimate: it travels alone
    return [(i, costs.get(i, float("inf"))) for i in ids]


def _mapping(config: Any) -> Mapping[str, Any]:
    return json.loads(config) if isinstance(config, str) else config
