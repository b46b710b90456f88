"""Every bad option value gets a clear message and exit code 2, and nothing is recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cloudai.cli.main import cli
from cloudai.store.sqlite import SQLiteStore


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    # Redis on a port where nothing listens: parsing errors must come before any connection
    return {"CLOUDAI_STORE_URL": f"sqlite:///{tmp_path}/s.db", "CLOUDAI_REDIS_URL": "redis://127.0.0.1:9/0",
            "CLOUDAI_USER": "ana"}


def test_help_lists_the_command_groups() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in ("submit", "task", "monitor", "logs", "status", "list", "cancel", "workers", "worker", "beat",
                 "flower"):
        assert f"  {name} " in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cpus", "two"], "invalid cpus 'two'"),
        (["--cpus", "0"], "more than 0"),
        (["-m", "4x"], "invalid memory '4x'"),
        (["--memory", "1m"], "at least 6m"),
        (["--memory", "512"], "a bare number is bytes, and Docker needs at least 6m; did you mean 512g?"),
        (["--gpus", "0.5"], "whole number of GPUs"),
        (["--storage", "big"], "invalid storage 'big'"),
        (["--timeout", "soon"], "invalid timeout 'soon'"),
        (["-e", "NOVALUE"], "KEY=VALUE"),
        (["-e", "1BAD=x"], "invalid env '1BAD'"),
        (["--label", "=x"], "KEY=VALUE"),
        (["--retries", "-1"], "invalid retries '-1': use a whole number from 0 to 100"),
        (["--retries", "two"], "invalid retries 'two'"),
        (["--priority", "1.5"], "invalid priority '1.5'"),
        (["--pull", "sometimes"], "invalid pull policy 'sometimes': use one of missing, always, never"),
        (["-w", "relative/dir"], "absolute path"),
        (["--env-file", "/nonexistent/env"], "could not be read"),
    ],
)
def test_bad_submit_values(env: dict[str, str], args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["submit", *args, "busybox", "true"], env=env)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert SQLiteStore(f"{tmp_path}/s.db").list_tasks(limit=None) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [(["-cpu_cores", "abc"], "invalid cpus"), (["-mem", "-4"], "invalid memory"), (["-gpu_cores", "1.5"], "GPUs")],
)
def test_bad_seed_task_values(env: dict[str, str], args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["task", "w1", "busybox", *args, "echo", "hi"], env=env)
    assert result.exit_code == 2 and message in result.output


def test_missing_image_is_a_usage_error(env: dict[str, str]) -> None:
    result = CliRunner().invoke(cli, ["submit"], env=env)
    assert result.exit_code == 2 and "IMAGE" in result.output


def test_unreachable_redis_is_a_clear_error_with_its_exit_code(env: dict[str, str]) -> None:
    result = CliRunner().invoke(cli, ["quota"], env=env)  # direct mode: an operator's read of Redis
    assert result.exit_code == 123
    assert "Redis at redis://127.0.0.1:9/0 can't be reached" in result.output


@pytest.mark.parametrize("command", [["submit", "busybox", "true"], ["task", "w1", "busybox", "true"],
                                     ["cancel", "t1"], ["workers", "drain", "w1"], ["workers", "undrain", "w1"],
                                     ["workers", "remove", "w1"]])
def test_changes_need_the_master(env: dict[str, str], tmp_path: Path, command: list[str]) -> None:
    """One front door: without CLOUDAI_API_URL a command that changes the cluster says how to reach the master,
    and records nothing (the store stays empty; Redis is never asked)."""
    result = CliRunner().invoke(cli, command, env=env)
    assert result.exit_code == 2, result.output
    assert "goes through the CloudAI master: set CLOUDAI_API_URL" in result.output and "cloudai login" in result.output
    assert SQLiteStore(f"{tmp_path}/s.db").list_tasks(limit=None) == []


def test_unknown_task(env: dict[str, str]) -> None:
    result = CliRunner().invoke(cli, ["status", "nope"], env=env)
    assert result.exit_code == 122 and "no task 'nope'" in result.output


def test_bad_store_url(env: dict[str, str]) -> None:
    result = CliRunner().invoke(cli, ["status", "x"], env={**env, "CLOUDAI_STORE_URL": "postgres://db"})
    assert result.exit_code == 2 and "mongodb://" in result.output
