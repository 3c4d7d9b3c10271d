"""Shared rendering for the commands: one Console policy, --json, value formatting.

Colour only on a terminal (rich's own detection) and never with NO_COLOR set,
even when a terminal is forced (FORCE_COLOR): NO_COLOR turns off every style
code, not only the colours.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from typing import IO, Any

from rich.console import Console

from service.exceptions import MlpqError


def console(*, stderr: bool = False) -> Console:
    """The Console every command prints with."""
    if os.environ.get("NO_COLOR"):
        return Console(stderr=stderr, color_system=None, highlight=False)
    return Console(stderr=stderr, highlight=False)


def _default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def print_json(data: Any) -> None:
    """``data`` as JSON on stdout (datetimes as ISO 8601), for ``--json``."""
    sys.stdout.write(json.dumps(data, default=_default, indent=2) + "\n")


class OutputError(MlpqError):
    """An output file cannot be written where the user asked."""

    exit_code = 2


@contextlib.contextmanager
def atomic_output(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """A file object writing beside ``path``, renamed onto it only when the block succeeds.

    A failed or interrupted command never leaves a half-written file behind,
    and an existing file is replaced in one step.
    """
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"-o {path}: is a directory; expected a file path")
    if not target.parent.is_dir():
        raise OutputError(f"-o {path}: no directory {str(target.parent)!r}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as exc:
        raise OutputError(f"-o {path}: cannot write there ({exc.strerror})") from None
    try:
        kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
        with open(fd, mode, **kwargs) as out:
            yield out
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def fmt(value: Any) -> str:
    """A table cell: ``-`` for NULL, 4 significant digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def dataset_label(value: Any, labels: dict[str, str]) -> str:
    """A CSV dataset by its file name (``csv:<sha256>`` as stored is unreadable)."""
    if isinstance(value, str) and value in labels:
        return labels[value]
    if isinstance(value, str) and value.startswith("csv:"):
        return value[:12] + "…"
    return fmt(value)


def duration(seconds: float | None) -> str:
    """``3h02m``, ``4m05s``, ``12s`` or ``-``."""
    if seconds is None:
        return "-"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float | None], width: int, low: float, high: float) -> str:
    """``values`` resampled to ``width`` cells, each a block from ``low`` (▁) to ``high`` (█)."""
    if not values:
        return ""
    cells = []
    n = len(values)
    for i in range(min(width, n)):
        chunk = [
            v
            for v in values[
                i * n // min(width, n) : max(
                    i * n // min(width, n) + 1, (i + 1) * n // min(width, n)
                )
            ]
            if v is not None and math.isfinite(v)
        ]
        if not chunk:
            cells.append(" ")
            continue
        v = sum(chunk) / len(chunk)
        span = high - low
        level = 0 if span <= 0 else round((v - low) / span * (len(_BARS) - 1))
        cells.append(_BARS[max(0, min(len(_BARS) - 1, level))])
    return "".join(cells)


class PlainProgress:
    """Progress for logs: without a terminal, one plain line every ``every`` seconds.

    ``update(done, total, detail)`` is cheap to call on every poll; it prints
    ``12/48 runs finished, 3 running, 1.9 runs/s`` (to stderr) when the last
    line is ``every`` seconds old. On a terminal it prints nothing (the rich
    bar is shown instead).
    """

    def __init__(self, *, enabled: bool, every: float = 5.0) -> None:
        import time

        self.enabled = enabled
        self.every = every
        self._clock = time.monotonic
        self._last = self._clock()

    def update(self, done: int, total: int, detail: str) -> None:
        now = self._clock()
        if not self.enabled or now - self._last < self.every:
            return
        self._last = now
        print(f"{done}/{total} runs finished, {detail}", file=sys.stderr, flush=True)
