"""Names a run's stored config shares with the workers, in a module that imports nothing.

The worker reads them from every run it trains; importing them must not pull in
the grid parser (pydantic, YAML).
"""

#: Key of a run's config (beside the TrainConfig keys) holding its time limit in seconds.
TIME_LIMIT_KEY = "time_limit"
