"""Settings come from MLPQ_* variables, validated once, bad values in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.exceptions import SettingsError
from service.settings import load_settings


def test_defaults_need_no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MLPQ_HOME", "MLPQ_DATABASE_URL", "MLPQ_BROKER_URL"):
        monkeypatch.delenv(var, raising=False)
    settings = load_settings()
    assert settings.database_url == "sqlite:///.mlpq/mlpq.db"
    assert settings.embedded_broker
    assert settings.queue_dir.as_posix() == ".mlpq/queue"


def test_home_moves_the_default_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLPQ_DATABASE_URL", raising=False)
    monkeypatch.setenv("MLPQ_HOME", "/tmp/somewhere")
    assert load_settings().database_url == "sqlite:////tmp/somewhere/mlpq.db"


def test_plain_postgresql_url_gets_the_psycopg3_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLPQ_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test")
    assert load_settings().database_url == "postgresql+psycopg://root@127.0.0.1:5432/test"


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("MLPQ_DATABASE_URL", "mysql://root@localhost/x", "MLPQ_DATABASE_URL: expected a sqlite"),
        ("MLPQ_DATABASE_URL", "not a url", "MLPQ_DATABASE_URL: expected a sqlite"),
        ("MLPQ_BROKER_URL", "kafka://x", "MLPQ_BROKER_URL: expected a URL starting with"),
        ("MLPQ_HEARTBEAT_SECONDS", "-1", "MLPQ_HEARTBEAT_SECONDS: Input should be greater than 0"),
        ("MLPQ_MAX_ATTEMPTS", "many", "MLPQ_MAX_ATTEMPTS: Input should be a valid integer"),
    ],
)
def test_bad_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith(expected)
    assert "\n" not in message
    assert repr(value) in message


def test_cli_prints_bad_setting_as_one_line_and_exits_2(tmp_path) -> None:
    env = {"PATH": "/usr/bin:/bin", "MLPQ_BROKER_URL": "kafka://x", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", "from cli.main import main; main()", "sql", "select 1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "mlpq: MLPQ_BROKER_URL: expected a URL starting with one of redis://, rediss://, amqp://, "
        "pyamqp://, filesystem://; got 'kafka://x'"
    ]


def test_workers_hold_two_messages_each_only_on_the_embedded_queue(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.queue.app import celery_config

    monkeypatch.delenv("MLPQ_BROKER_URL", raising=False)
    embedded = celery_config(load_settings(home=tmp_path))
    shared = celery_config(load_settings(home=tmp_path, broker_url="redis://127.0.0.1:6379/0"))
    # The folder is polled: a second message in hand saves each run a wait for the poll.
    assert embedded["worker_prefetch_multiplier"] == 2
    # Many workers share a broker: none holds what another could start.
    assert shared["worker_prefetch_multiplier"] == 1
    assert embedded["task_acks_late"] and shared["task_acks_late"]
