"""Packing runs into messages by their estimated cost (service.queue.packing, engine.cost)."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from pytest import approx

from engine.cost import SECONDS_PER_RUN, estimate_seconds
from service.queue.packing import MIN_MESSAGES, MIN_PACK_SECONDS, pack, spread_limit

COSTS = st.lists(st.floats(0.0001, 5.0) | st.just(math.inf), min_size=0, max_size=300).map(
    lambda costs: [(i + 1, c) for i, c in enumerate(costs)]
)


@given(COSTS, st.floats(0.01, 1.0))
def test_every_run_once_longest_first_and_no_pack_over_its_limit(costs, target) -> None:
    packs = pack(costs, target)
    # All there is to run: the longest first (so the workers end together), and runs of
    # equal estimates in their order.
    longest_first = sorted(costs, key=lambda run: (-run[1], run[0]))
    assert [i for p in packs for i in p] == [i for i, _ in longest_first]
    cost = dict(costs)
    finite = [c for c in cost.values() if c != math.inf]
    limit = min(target, spread_limit(sum(finite))) if finite else target
    for p in packs:
        if len(p) > 1:  # a run over the limit travels alone
            assert sum(cost[i] for i in p) <= limit * (1 + 1e-9)
            assert all(cost[i] != math.inf for i in p)


@given(st.integers(1, 2000), st.floats(0.05, 1.0))
def test_equal_short_runs_fill_their_packs_and_spread_over_enough_messages(n, target) -> None:
    packs = pack([(i, 0.004) for i in range(n)], target)
    # A small grid still feeds every process, in packs worth their message.
    enough = min(n, MIN_MESSAGES, n * 0.004 / MIN_PACK_SECONDS)
    assert len(packs) >= math.floor(enough * 0.5)
    assert all(len(p) >= int(MIN_PACK_SECONDS / 0.004 + 1e-9) for p in packs[:-1])
    if n * 0.004 > target * MIN_MESSAGES * 2:  # a big grid: packs of about the target
        assert max(map(len, packs)) == int(target / 0.004 + 1e-9)


@given(COSTS, st.floats(0.01, 1.0))
def test_the_head_of_a_longer_queue_keeps_its_order(costs, target) -> None:
    packs = pack(costs, target, spread=False)
    assert [i for p in packs for i in p] == [i for i, _ in costs]
    cost = dict(costs)
    assert all(sum(cost[i] for i in p) <= target * (1 + 1e-9) for p in packs if len(p) > 1)


def test_no_target_is_one_run_per_message() -> None:
    assert pack([(1, 0.1), (2, 0.1)], 0) == [[1], [2]]


def test_the_estimate_grows_with_the_work_and_knows_no_csv() -> None:
    base = {"dataset": "moons", "optimizer": "backprop", "hidden": [16], "max_steps": 20}
    small = estimate_seconds(base)
    assert 0 < small < 0.05
    steps = small - SECONDS_PER_RUN
    assert estimate_seconds({**base, "max_steps": 200}) - SECONDS_PER_RUN == approx(10 * steps)
    assert estimate_seconds({**base, "hidden": [256, 256]}) > estimate_seconds(base)
    assert estimate_seconds({**base, "dataset": "digits"}) > estimate_seconds(base)
    rw = {**base, "optimizer": "random_walk", "candidates": 1}
    assert estimate_seconds({**rw, "candidates": 64}) - SECONDS_PER_RUN > 2 * (
        estimate_seconds(rw) - SECONDS_PER_RUN
    )
    # a budget in evaluations caps the steps
    assert estimate_seconds({**base, "max_steps": 10_000, "max_evaluations": 21}) == small
    assert estimate_seconds({**base, "dataset": "csv:" + "0" * 64}) == math.inf
