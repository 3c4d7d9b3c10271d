"""``python -m worker``: the Celery worker `mlpq worker` and `mlpq run` start.

The same worker as ``celery -A worker.app worker --pool prefork --queues mlpq
--without-mingle --without-gossip``, started without Celery's command line, which
loads every installed Celery plugin's commands (Flower's, for one) before the
worker: a tenth of a second on every start of `mlpq run`.
"""

from __future__ import annotations

import gc

# The cyclic collector stays off until the pool forks (see main): the imports make
# some 140,000 objects that live as long as the process, and its passes
# over them were a tenth of the worker's start.
gc.disable()

import argparse  # noqa: E402
import sys  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--concurrency", "-c", type=int, required=True)
    parser.add_argument("--loglevel", "-l", default="INFO")
    parser.add_argument("--hostname", "-n", default=None, help="node name, e.g. w1@%%h")
    args = parser.parse_args(argv)

    from celery.utils.nodenames import default_nodename, host_format

    from service.queue.names import QUEUE
    from worker.app import app

    worker = app.Worker(
        hostname=host_format(default_nodename(args.hostname)),
        pool_cls="prefork",
        concurrency=args.concurrency,
        queues=[QUEUE],
        loglevel=args.loglevel,
        # No result backend and no remote revokes to sync: no one-second mingle round,
        # no gossip traffic.
        without_mingle=True,
        without_gossip=True,
    )
    # What the imports made is moved out of the collector's sight before the pool
    # forks, then the collector goes back on: the recipe of gc.freeze's documentation
    # for a parent that forks (no collection in a child walks, or writes to, the pages
    # it shares with the parent), and no pass here walks them either.
    gc.freeze()
    gc.enable()
    worker.start()
    return worker.exitcode or 0


if __name__ == "__main__":
    sys.exit(main())
