"""The store's questions about running runs read ``ix_runs_running_heartbeat`` (0006).

The index holds running runs only, so a submit of queued runs writes nothing to it.
The queries must still find it in a store of mostly queued runs: the reaper's stale
heartbeats, a dead worker's runs, the window's count of running runs and its look
for lost messages. Each statement they send is captured and explained, on both stores.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine, event, text

from service.queue import window
from service.store import utcnow
from service.store.runs import reap_stale, requeue_dead_owners

QUEUED = 20_000
RUNNING = 50


def _fill(engine: Engine, add_runs) -> None:
    add_runs(engine, 1)
    with engine.begin() as conn:
        conn.execute(
            text(
                "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < :n) "
                "INSERT INTO runs (experiment_id, config, config_hash, optimizer, dataset, "
                "hidden, activation, seed, max_steps, status, published, attempt, "
                "cancel_requested, created_at) "
                "SELECT r.experiment_id, r.config, r.config_hash, r.optimizer, r.dataset, "
                "r.hidden, r.activation, s.i, r.max_steps, r.status, r.published, r.attempt, "
                "r.cancel_requested, r.created_at FROM runs r, s"
            ),
            {"n": QUEUED},
        )
        conn.execute(
            text(
                "UPDATE runs SET status = 'running', worker = 'gone@nowhere:1', attempt = 1, "
                "heartbeat_at = :old, published = :yes, published_at = :old WHERE id <= :k"
            ),
            {"old": utcnow() - timedelta(hours=1), "yes": True, "k": RUNNING},
        )
        conn.execute(text("ANALYZE" if engine.dialect.name == "sqlite" else "ANALYZE runs"))


def _explain(engine: Engine, statements: list[tuple[str, object]]) -> dict[str, str]:
    prefix = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    plans = {}
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for statement, parameters in statements:
            cursor.execute(prefix + statement, parameters)
            plans[statement] = "\n".join(str(row[-1]) for row in cursor.fetchall())
    finally:
        raw.rollback()
        raw.close()
    return plans


def test_queries_on_running_runs_read_the_partial_index(store_engine: Engine, add_runs) -> None:
    _fill(store_engine, add_runs)
    sent: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany) -> None:
        if "running" in str(parameters) or "'running'" in statement:
            sent.append((statement, parameters))

    event.listen(store_engine, "before_cursor_execute", capture)
    try:
        with store_engine.connect() as conn:
            conn.execute(window._COUNT_RUNNING)
            window.lost_runs(conn, grace_seconds=60, queue_empty=False, now=utcnow())
            result = reap_stale(session=conn, stale_seconds=60, max_attempts=3)
            conn.rollback()
            requeue_dead_owners(session=conn)
            conn.rollback()
    finally:
        event.remove(store_engine, "before_cursor_execute", capture)
    assert len(result.requeued) == RUNNING  # the data is what the plans were made for
    assert len(sent) >= 5, sent
    for statement, plan in _explain(store_engine, sent).items():
        assert "ix_runs_running_heartbeat" in plan, (statement, plan)
        assert "Seq Scan on runs" not in plan and "SCAN runs\n" not in plan + "\n", plan
