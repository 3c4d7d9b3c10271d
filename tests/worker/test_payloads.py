"""The train task's payload check: one run id, or a pack of them, each within int4."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from worker.tasks import MAX_PACK, MAX_RUN_ID, parse_run_ids

GOOD_ID = st.integers(1, MAX_RUN_ID)
JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=True)
    | st.text(max_size=5)
    | st.integers(max_value=0)
    | st.integers(min_value=MAX_RUN_ID + 1),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=8,
)


@given(GOOD_ID)
def test_one_id_is_a_pack_of_one(run_id: int) -> None:
    assert parse_run_ids((run_id,), {}) == [run_id]


@given(st.lists(GOOD_ID, min_size=1, max_size=50))
def test_a_list_of_ids_is_a_pack(ids: list[int]) -> None:
    assert parse_run_ids((ids,), {}) == ids


@given(st.lists(GOOD_ID, max_size=5), JUNK, st.integers(0, 5))
def test_any_junk_in_the_payload_refuses_it(ids: list[int], junk: Any, where: int) -> None:
    bad = [*ids[:where], junk, *ids[where:]]
    assert parse_run_ids((bad,), {}) is None
    if not isinstance(junk, list):
        assert parse_run_ids((junk,), {}) is None


def test_wrong_shapes_are_refused() -> None:
    assert parse_run_ids((), {}) is None
    assert parse_run_ids((1, 2), {}) is None
    assert parse_run_ids((), {"run_id": 1}) is None
    assert parse_run_ids(([],), {}) is None
    assert parse_run_ids(([1] * (MAX_PACK + 1),), {}) is None
    assert parse_run_ids((2**70,), {}) is None
