"""The worker app with its runs paced: a pause after every step.

For the tests that act on a run while it trains (kill its worker, cancel it, let
Redis redeliver its message): the pause lies outside the engine's clock and
arithmetic, so the run computes exactly what it would unpaced, but lasts long
enough for the test's action on any machine. Unpaced, LONG_RUN ends in about a
second on a fast one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from engine.trainer import Trainer
from worker.app import app

__all__ = ["STEP_PAUSE", "app"]

#: Seconds of pause after each step: LONG_RUN's 1,500 steps last at least 3 s.
STEP_PAUSE = 0.002

_steps = Trainer.steps


def _paced_steps(self: Trainer) -> Iterator[dict[str, Any] | None]:
    for record in _steps(self):
        yield record
        time.sleep(STEP_PAUSE)


Trainer.steps = _paced_steps
