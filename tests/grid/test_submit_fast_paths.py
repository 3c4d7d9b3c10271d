"""The fast paths of a big submit give what the general functions give.

- ``fast_canonical_json`` and the JSON ``block_configs`` puts together from pieces
  equal ``canonical_json`` (``json.dumps`` with sorted keys), so config hashes stay
  those of earlier submits;
- the rows ``_insert_runs`` writes (binary COPY on PostgreSQL, tuples on SQLite)
  store what ``run_row`` rows inserted by SQLAlchemy store, and the binary rows
  are encoded as the columns' types in the migrated store;
- the hash lookup's array literal reads back as the list it was made of.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, Engine, insert, select, text

from service.grids import TIME_LIMIT_KEY, config_hash, expand_grid, parse_grid
from service.grids.canonical import canonical_json, fast_canonical_json
from service.grids.loader import RunSpec
from service.queue.enqueue import (
    _BINARY_TYPES,
    _COPY_COLUMNS,
    _insert_runs,
    _pg_text_array,
    run_row,
)
from service.store import Experiment, Run, utcnow

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FLOATS = st.one_of(
    st.sampled_from([1e-05, 0.1, 0.3, -0.0, 0.0, 1.0, 2.5e-300, 1e16, 0.1 + 0.2]),
    st.floats(allow_nan=False, allow_infinity=False),
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), FLOATS, st.text())
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
CONFIGS = st.dictionaries(st.text(), VALUES, max_size=12)


def expand(data: dict[str, Any]):
    return expand_grid(parse_grid(data, source="grid.yaml"))


@SETTINGS
@given(CONFIGS)
def test_the_fast_encoder_gives_json_dumps_sorted_text(config: dict[str, Any]) -> None:
    assert fast_canonical_json(config) == canonical_json(config)
    assert canonical_json(config) == json.dumps(
        config, sort_keys=True, separators=(",", ":"), allow_nan=False
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_the_fast_encoder_refuses_nan_and_infinity_like_the_definition(bad: float) -> None:
    for encode in (canonical_json, fast_canonical_json):
        with pytest.raises(ValueError):
            encode({"learning_rate": [0.1, bad]})


GRIDS = [
    {  # the benchmark's grid, two seeds: its first hash was computed before the fast paths
        "name": "bench",
        "datasets": ["moons", "xor", "circles", "spirals", "blobs"],
        "model": {
            "hidden": [[8], [16], [32], "16x16", "32x16"],
            "activation": ["relu", "tanh", "sigmoid", "leaky_relu"],
        },
        "seeds": 2,
        "budget": {"epochs": 5, "iterations": 50},
        "optimizers": [
            {
                "optimizer": "backprop",
                "learning_rate": [0.3, 0.1, 0.03, 0.01, 0.003],
                "batch_size": [16, 32, 64, 128, 256],
            },
            {
                "optimizer": "random_walk",
                "step_size": [0.3, 0.1, 0.03, 0.01, 0.003],
                "candidates": [1, 2, 4, 8, 16],
            },
        ],
    },
    {  # an evaluation budget changes each config after its product: encoded whole
        "datasets": "moons",
        "seeds": 3,
        "budget": {"evaluations": 500, "time_limit": 30},
        "optimizers": [
            {"optimizer": "backprop", "learning_rate": [1e-05, 0.1], "momentum": [0.0, 0.9]},
            {"optimizer": "random_walk", "step_size": 0.05, "candidates": [1, 4]},
        ],
    },
    {  # zipped axes, random draws, an exclusion and a time limit
        "datasets": ["xor", "blobs"],
        "model": {"hidden": [[4], [8, 4]], "activation": ["tanh", "relu"]},
        "seeds": [3, 7],
        "budget": {"time_limit": 12.5},
        "samples": 5,
        "sampler_seed": 1,
        "exclude": [{"activation": "relu", "hidden": [4]}],
        "optimizers": [
            {
                "optimizer": "backprop",
                "learning_rate": {"loguniform": [1e-4, 1e-1]},
                "batch_size": [8, 16],
                "weight_decay": [0.0, 1e-4],
                "zip": [["batch_size", "weight_decay"]],
            }
        ],
    },
]


@pytest.mark.parametrize("data", GRIDS, ids=["bench", "evaluations", "zip-samples"])
def test_every_config_hash_is_the_sha256_of_json_dumps_sorted(data: dict[str, Any]) -> None:
    grid = expand(data)
    assert len(grid) > 4
    for run in grid.runs:
        config = {k: v for k, v in run.config.items() if k != TIME_LIMIT_KEY}
        text = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
        assert run.config_hash == hashlib.sha256(text.encode()).hexdigest() == config_hash(config)


def test_the_first_hash_of_the_benchmark_grid_is_the_one_earlier_submits_stored() -> None:
    grid = expand(GRIDS[0])
    assert grid.runs[0].config_hash == (
        "ec2f039179d7f9539b0bb80ad35bb35f9461c8cb9647eda5607aeee4d61eefa8"
    )


def _awkward_runs() -> list[RunSpec]:
    """Runs whose values test the encoding of text and the memo of shared values."""
    base = expand(GRIDS[1]).runs[:4] + expand(GRIDS[2]).runs[:4]
    runs = list(base)
    template = dict(base[0].config)
    odd = [
        {"dataset": 'tab\there, back\\slash, new\nline, cr\r, quote" ü €', "seed": 1},
        {"dataset": "moons", "momentum": -0.0, "seed": 1},  # -0.0 and 0.0 are equal keys
        {"dataset": "moons", "momentum": 0.0, "seed": 1},
        {"dataset": "moons", "momentum": 0.0, "seed": 2},
        {"dataset": "moons", "learning_rate": 1e-05, "hidden": [32, 16], "seed": 9},
        {"dataset": "\\N", "activation": "relu", "seed": 4},  # a value spelled like NULL
        {"dataset": "moons", "seed": 5, "nested": {"seed": 6, "b": [1, True, None]}},
    ]
    for change in odd:
        config = {**template, **change}
        runs.append(RunSpec(config, config_hash(config), 0))
    return runs


def _new_experiment_runs(conn: Connection, name: str, runs: list[RunSpec]) -> list[int]:
    """A new experiment ``name`` with ``runs`` stored by ``_insert_runs``; their ids."""
    experiment = conn.execute(
        insert(Experiment.__table__)
        .values(name=name, spec={}, created_at=utcnow())
        .returning(Experiment.__table__.c.id)
    ).scalar_one()
    return _insert_runs(conn, experiment, runs, utcnow(), None)


def _stored(engine: Engine, experiment_id: int) -> list[dict[str, Any]]:
    table = Run.__table__
    skip = {"id", "experiment_id"}
    with engine.connect() as conn:
        rows = conn.execute(
            select(table).where(table.c.experiment_id == experiment_id).order_by(table.c.id)
        ).mappings()
        return [
            {k: repr(v) if isinstance(v, float) else v for k, v in row.items() if k not in skip}
            for row in rows
        ]


def test_rows_written_fast_store_what_run_row_rows_store(store_engine: Engine) -> None:
    runs = _awkward_runs()
    now = utcnow()
    experiments = Experiment.__table__
    with store_engine.begin() as conn:
        general, fast = (
            conn.execute(
                insert(experiments)
                .values(name=name, spec={}, created_at=now)
                .returning(experiments.c.id)
            ).scalar_one()
            for name in ("general", "fast")
        )
        conn.execute(insert(Run.__table__), [run_row(general, run, now) for run in runs])
        ids = _insert_runs(conn, fast, runs, now, None)
    assert len(ids) == len(runs)
    expected, got = _stored(store_engine, general), _stored(store_engine, fast)
    assert got == expected
    assert [row["config"] for row in got] == [run.config for run in runs]
    # The config column keeps -0.0 and 0.0 apart (the memo of shared values must too).
    assert (got[-6]["config"]["momentum"], got[-5]["config"]["momentum"]) == (-0.0, 0.0)
    assert str(got[-6]["config"]["momentum"]) == "-0.0"
    with store_engine.connect() as conn:
        texts = conn.execute(
            text("SELECT CAST(config AS text) FROM runs WHERE experiment_id = :e ORDER BY id"),
            {"e": fast},
        ).scalars()
        assert list(texts) == [canonical_json(run.config) for run in runs]


@pytest.mark.postgres
def test_binary_rows_encode_each_column_as_its_type_in_the_store(pg_store_url: str) -> None:
    from service.store import make_engine

    # json and enums are sent as their text in binary COPY, like text and varchar.
    as_sent = {"varchar": "text", "json": "text", "runstatus": "text"}
    engine = make_engine(pg_store_url)
    try:
        with engine.connect() as conn:
            types = dict(
                conn.execute(
                    text(
                        "SELECT column_name, udt_name FROM information_schema.columns "
                        "WHERE table_schema = current_schema() AND table_name = 'runs'"
                    )
                ).all()
            )
    finally:
        engine.dispose()
    assert [as_sent.get(types[c], types[c]) for c in _COPY_COLUMNS] == list(_BINARY_TYPES)


@pytest.mark.postgres
@given(
    st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00")), max_size=8)
)
@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_the_lookup_array_literal_reads_back_as_its_list(
    pg_store_url: str, values: list[str]
) -> None:
    from service.store import make_engine

    engine = make_engine(pg_store_url)
    try:
        with engine.connect() as conn:
            back = conn.execute(
                text("SELECT CAST(:a AS text[])"), {"a": _pg_text_array(values)}
            ).scalar_one()
        assert back == values
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_dedupe_lookups_are_planned_for_each_chunk_never_once_for_any_array(
    pg_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # psycopg prepares a statement run five times; five executions later PostgreSQL may
    # switch to one generic plan, which for `config_hash = ANY($1)` on the hash index
    # took 2.9 s a chunk of 20,000 against 0.08 s (bench/submit.py --resubmit).
    from service.queue import enqueue
    from service.store import make_engine

    runs = _awkward_runs()
    monkeypatch.setattr(enqueue, "LOOKUP_CHUNK", 1)  # one execution per hash: 15 or more
    engine = make_engine(pg_store_url)
    try:
        with engine.begin() as conn:
            _new_experiment_runs(conn, "e", runs)
        hashes = [run.config_hash for run in runs]
        assert len(hashes) >= 15
        with engine.begin() as conn:
            found = enqueue._existing(conn, hashes)
            plans = conn.execute(
                text(
                    "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                    "WHERE statement LIKE '%config_hash = ANY%'"
                )
            ).all()
        assert sorted(found) == sorted(set(hashes))
        assert [generic for generic, _ in plans if generic] == []
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_dedupe_lookups_read_the_hash_index_on_a_store_without_statistics(
    pg_store_url: str,
) -> None:
    # A store's first grid: ``runs`` was never analyzed, and PostgreSQL would take
    # ANY(thousands of hashes) to match every row and scan the whole table, which a
    # grid stored while it is expanded does once per chunk, over its own rows.
    from service.queue import enqueue
    from service.store import make_engine

    runs = _awkward_runs()
    engine = make_engine(pg_store_url)
    try:
        with engine.begin() as conn:
            _new_experiment_runs(conn, "e", runs)
        absent = [f"{i:064x}" for i in range(5000)]
        with engine.begin() as conn:
            assert conn.execute(
                text(
                    "SELECT last_analyze, last_autoanalyze FROM pg_stat_user_tables "
                    "WHERE relid = CAST('runs' AS regclass)"
                )
            ).one() == (None, None)
            found = enqueue._existing(conn, [runs[0].config_hash, *absent])
            seq, idx = conn.execute(
                text(
                    "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables "
                    "WHERE relid = CAST('runs' AS regclass)"
                )
            ).one()
            setting = conn.execute(text("SHOW enable_seqscan")).scalar_one()
        assert list(found) == [runs[0].config_hash]
        assert seq == 0 and idx > 0  # idx_scan counts each hash looked up in the index
        assert setting == "on"  # the rest of the transaction plans as it did
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_binary_rows_are_encoded_in_the_connections_client_encoding(pg_store_url: str) -> None:
    from service.store import make_engine

    template = dict(expand(GRIDS[1]).runs[0].config)
    config = {**template, "dataset": "müde Daten, naïve", "seed": 7}
    run = RunSpec(config, config_hash(config), 0)
    engine = make_engine(pg_store_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("SET client_encoding TO 'LATIN1'")
            (run_id,) = _new_experiment_runs(conn, "latin", [run])
        with engine.connect() as conn:
            stored = conn.execute(
                text("SELECT dataset, config FROM runs WHERE id = :id"), {"id": run_id}
            ).one()
    finally:
        engine.dispose()
    assert stored == ("müde Daten, naïve", config)
