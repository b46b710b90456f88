"""`cloudai flower` refuses to start without credentials unless --no-auth, and listens on 127.0.0.1 by default."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cloudai.cli.main import cli


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    import cloudai.celery_app

    calls: list[list[str]] = []
    monkeypatch.setattr(cloudai.celery_app, "run_celery", calls.append)
    monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    monkeypatch.delenv("FLOWER_AUTH", raising=False)
    return calls


def test_refuses_without_credentials(started: list[list[str]]) -> None:
    result = CliRunner().invoke(cli, ["flower"])
    assert result.exit_code == 2
    assert "without authentication" in result.output and "FLOWER_BASIC_AUTH" in result.output
    assert "--no-auth" in result.output and started == []


@pytest.mark.parametrize("auth", ["admin", "admin:", ":pw", "a:b,c"])
def test_refuses_malformed_credentials(started: list[list[str]], auth: str) -> None:
    result = CliRunner().invoke(cli, ["flower"], env={"FLOWER_BASIC_AUTH": auth})
    assert result.exit_code == 2 and "user:password" in result.output and started == []


def test_starts_on_localhost_with_credentials(started: list[list[str]]) -> None:
    result = CliRunner().invoke(cli, ["flower", "--port", "5600"], env={"FLOWER_BASIC_AUTH": "a:b,c:d"})
    assert result.exit_code == 0, result.output
    assert started == [["flower", "--port=5600", "--address=127.0.0.1", "--basic-auth=a:b,c:d"]]


def test_no_auth_and_address_on_purpose(started: list[list[str]]) -> None:
    result = CliRunner().invoke(cli, ["flower", "--no-auth", "--address", "0.0.0.0"])
    assert result.exit_code == 0, result.output
    assert started == [["flower", "--port=5555", "--address=0.0.0.0"]]
    assert "without authentication: anyone who reaches it" in result.output
