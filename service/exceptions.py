"""Small named errors of the service layer.

Each message is one line that starts with what is wrong and where
(``"MLPQ_DATABASE_URL: expected ..."``, ``"grid.optimizers[0].lr: ..."``); the CLI
prints it as it is and exits non-zero.
"""

from __future__ import annotations


class MlpqError(Exception):
    """Base of every error the CLI turns into one line and a non-zero exit."""

    exit_code = 1


class SettingsError(MlpqError):
    """An environment setting has a bad value."""

    exit_code = 2


class GridError(MlpqError):
    """A grid file or inline grid is invalid; nothing was written or enqueued."""

    exit_code = 2


class NotFoundError(MlpqError):
    """An experiment, run or dataset named by the user does not exist."""

    exit_code = 2


class StoreError(MlpqError):
    """The database cannot be reached or is not at the expected schema."""


class BrokerError(MlpqError):
    """The message broker cannot be reached."""
