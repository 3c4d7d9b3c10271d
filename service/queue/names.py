"""Names the submitter and the workers agree on, in a module that imports nothing.

The CLI reads them before it needs Celery (``mlpq run`` starts its workers first).
"""

#: The queue every train message goes to.
QUEUE = "mlpq"
#: Name of the train task (``worker.tasks.train``); messages carry only the run id.
TRAIN_TASK = "mlpq.train"
#: Name of the periodic stale-run reaper task.
REAP_TASK = "mlpq.reap_stale"
