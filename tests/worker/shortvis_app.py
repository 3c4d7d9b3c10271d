"""The worker app with a one-second Redis visibility timeout, restored every half second.

Only for the test that makes Redis redeliver a message while its run still
trains: the claim must refuse the second delivery.
"""

from __future__ import annotations

from worker.app import app

app.conf.broker_transport_options = {
    **app.conf.broker_transport_options,
    "visibility_timeout": 1,
    "unacked_restore_interval": 0.5,
    "unacked_restore_throttle": 1,
}
