"""The worker app with a one-second Redis visibility timeout, restored every half second.

Only for the test that makes Redis redeliver a message while its run still
trains: the claim must refuse the second delivery. Its runs are paced (a pause
after every step, outside the engine's clock and arithmetic), so a run outlives
the timeout however fast the machine trains: on a fast one, an unpaced 1,500-step
run ended before Redis restored its message.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from engine.trainer import Trainer
from worker.app import app

#: Seconds of pause after each step: 1,500 steps last at least 3 s.
STEP_PAUSE = 0.002

app.conf.broker_transport_options = {
    **app.conf.broker_transport_options,
    "visibility_timeout": 1,
    "unacked_restore_interval": 0.5,
    "unacked_restore_throttle": 1,
}

_steps = Trainer.steps


def _paced_steps(self: Trainer) -> Iterator[dict[str, Any] | None]:
    for record in _steps(self):
        yield record
        time.sleep(STEP_PAUSE)


Trainer.steps = _paced_steps
