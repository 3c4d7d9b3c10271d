"""The embedded queue: kombu's filesystem transport, with messages written atomically.

kombu's ``filesystem`` transport creates a message's file under its final name and
then writes it; a consumer listing the folder between the two moves an empty
file and fails to decode it (the worker stops with a ``JSONDecodeError``). Here
the message is written under a name the consumer ignores and renamed into place,
which is atomic on one filesystem: a consumer sees the whole message or none.

A worker's loop waits here for messages up to 2 s at a time, and notices that it
should stop only between two waits: a stopped worker idled up to 2 s before it
handed its messages back. The wait here lasts at most ``MAX_WAIT_SECONDS``.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

#: Longest single wait for a message (a worker's loop looks at its shutdown flag between).
MAX_WAIT_SECONDS = 0.1


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        """Put ``payload`` onto ``queue``: written aside, then renamed into the folder."""
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = f"{final}.part"  # not "<queue>.msg" after the first dot: never consumed
        try:
            with open(partial, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:
        """Wait for one message at most ``MAX_WAIT_SECONDS`` (a timeout says none came)."""
        if timeout is not None:
            timeout = min(timeout, MAX_WAIT_SECONDS)
        super().drain_events(connection, timeout=timeout)
