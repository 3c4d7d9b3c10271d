"""The ``mlpq`` console script: ``mlpq run`` starts its local workers before anything else.

A Celery worker takes most of a second to start. ``mlpq run`` overlaps that with
reading and submitting the grid, and the earlier the workers start the more of it is
hidden: here they start before the CLI itself is imported (Typer, rich, the
commands: a quarter of a second). Only the arguments are looked at, with nothing
imported but ``worker.local``; ``cli.runs`` takes the workers over (``take``) when
its own parsing agrees, and anything left untaken, by a mistyped command say, is
killed on the way out along with the folder it created.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Options after which ``mlpq run`` starts no local worker (or exits before training).
_NO_WORKERS = frozenset({"--help", "-h", "--dry-run", "--no-local-workers"})


@dataclass
class Prestarted:
    concurrency: int
    home: Path
    home_existed: bool
    workers: Any  # worker.local.LocalWorkers


_prestarted: Prestarted | None = None


def run_concurrency(args: list[str]) -> int | None:
    """The local workers ``mlpq run`` with ``args`` will start, or None (none, or unsure)."""
    if not args or args[0] != "run" or _NO_WORKERS.intersection(args):
        return None
    value: str | None = "0"
    for i, arg in enumerate(args):
        if arg in ("--concurrency", "-c"):
            value = args[i + 1] if i + 1 < len(args) else None
        elif arg.startswith("--concurrency="):
            value = arg.partition("=")[2]
        elif arg.startswith("-c") and len(arg) > 2 and not arg.startswith("--"):
            value = arg[2:]
    if value is None or not value.isdigit():
        return None  # Typer will say what is wrong
    return int(value) or os.cpu_count() or 1


def start_early(args: list[str]) -> None:
    """Start the local workers of ``mlpq run args`` now, if it will start any."""
    global _prestarted
    concurrency = run_concurrency(args)
    if concurrency is None:
        return
    from worker.local import LocalWorkers, log_file

    home = Path(os.environ.get("MLPQ_HOME") or ".mlpq")
    existed = home.exists()
    try:
        workers = LocalWorkers(concurrency=concurrency, log_path=log_file(home))
    except OSError:
        return  # the command will meet the same problem and say it in one line
    _prestarted = Prestarted(concurrency, home, existed, workers)


def take(concurrency: int, home: Path) -> tuple[Any, bool] | None:
    """The workers started early, with whether ``home`` existed before, if they fit the command.

    Workers that do not fit (another concurrency or home than the settings say) are
    killed: the caller starts its own.
    """
    global _prestarted
    early, _prestarted = _prestarted, None
    if early is None:
        return None
    if early.concurrency == concurrency and early.home.resolve() == home.resolve():
        return early.workers, early.home_existed
    _discard(early)
    return None


def discard() -> None:
    """Kill workers started early that no command took, and the folder made for them."""
    global _prestarted
    early, _prestarted = _prestarted, None
    if early is not None:
        _discard(early)


def _discard(early: Prestarted) -> None:
    early.workers.kill()
    if not early.home_existed:
        shutil.rmtree(early.home, ignore_errors=True)


def entry() -> None:
    """Console-script entry point (``mlpq``)."""
    args = sys.argv[1:]
    if args[:1] in (["run"], ["submit"]):
        # The collector stays off while these commands import what they need and
        # submit (collector_back_on): its passes over the objects the imports make,
        # which live as long as the process, were a tenth of the imports' time.
        gc.disable()
    start_early(args)
    from cli.main import entry as main_entry

    main_entry()


def collector_back_on() -> None:
    """The collector on again, what was made meanwhile in its oldest generation, unwalked."""
    if not gc.isenabled():
        gc.freeze()
        gc.unfreeze()
        gc.enable()
