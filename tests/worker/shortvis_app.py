"""The paced worker app with a one-second Redis visibility timeout, restored every half second.

Only for the test that makes Redis redeliver a message while its run still
trains: the claim must refuse the second delivery. The runs are paced
(``paced_app``), so a run outlives the timeout however fast the machine trains:
unpaced, on a fast machine, a 1,500-step run ended before Redis restored its
message.
"""

from __future__ import annotations

from paced_app import app

app.conf.broker_transport_options = {
    **app.conf.broker_transport_options,
    "visibility_timeout": 1,
    "unacked_restore_interval": 0.5,
    "unacked_restore_throttle": 1,
}
