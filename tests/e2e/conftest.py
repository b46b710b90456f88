"""The end-to-end tests' `cloudai` command line: reads in an operator's direct mode or through the master,
changes always through the master (one front door). The master starts on a test's first change, not before."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from cloudai.settings import Settings
from tests.helpers import ROOT, cli_env, cloudai


class Cli:
    """Runs ``cloudai`` as a user of this test's cluster would: a command that changes the cluster goes through
    the master (``api_server``, a token of the test's user), a read through it too when ``reads_via_master``,
    else directly on Redis and the store."""

    def __init__(self, request: pytest.FixtureRequest, settings: Settings) -> None:
        self.request = request
        self.settings = settings
        self.reads_via_master = False
        self._master_env: dict[str, str] | None = None

    def master_env(self) -> dict[str, str]:
        if self._master_env is None:
            server = self.request.getfixturevalue("api_server")
            self._master_env = server.cli_env(server.token(self.settings.user))
        return self._master_env

    def env_for(self, args: tuple[str, ...]) -> dict[str, str]:
        if self.reads_via_master or changes(args):
            return self.master_env()
        return cli_env(self.settings)


def changes(args: tuple[str, ...]) -> bool:
    """Whether ``cloudai ARGS`` changes the cluster (and so needs the master)."""
    return (args[0] in ("submit", "task", "cancel") and "--dry-run" not in args) or (
        args[0] == "workers" and len(args) > 1 and args[1] in ("drain", "undrain", "remove")) or (
        args[0] == "artifacts" and "--delete" in args)


_CURRENT: list[Cli] = []


@pytest.fixture(autouse=True)
def cli_session(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Cli]:
    session = Cli(request, settings)
    _CURRENT[:] = [session]
    yield session
    _CURRENT.clear()


def run(settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``cloudai ARGS`` in this test's session (see :class:`Cli`)."""
    env = _CURRENT[0].env_for(args) if _CURRENT else cli_env(settings)
    return subprocess.run(cloudai(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def submit(settings: Settings, *args: str) -> str:
    """``cloudai submit -q ARGS`` through the master; the task id."""
    result = run(settings, "submit", "-q", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()
