"""The engine's named errors."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid run configuration or dataset.

    The message starts with the offending key, e.g.
    ``"learning_rate: must be > 0, got -1"``, so callers can show it as is.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")
