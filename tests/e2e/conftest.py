"""The end-to-end tests' `cloudai` command line: reads in an operator's direct mode or through the master,
changes always through the master (one front door). The master starts on a test's first change, not before."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import ROOT, ServerProc, cli_env, cloudai


class Cli:
    """Runs ``cloudai`` as a user of this test's cluster would: a command that changes the cluster goes through
    the master (``api_server``, a token of the test's user), a read through it too when ``reads_via_master``,
    else directly on Redis and the store."""

    def __init__(self, request: pytest.FixtureRequest, settings: Settings) -> None:
        self.request = request
        self.settings = settings
        self.reads_via_master = False
        self._envs: dict[tuple[str, str], dict[str, str]] = {}

    def master_env(self, settings: Settings | None = None) -> dict[str, str]:
        """The environment of a user of the master on ``settings``' Redis and store (the test's own by default:
        the ``api_server`` fixture; another, such as a test's private Redis, gets a master of its own)."""
        settings = settings or self.settings
        key = (settings.redis_url, settings.store_url)
        if key not in self._envs:
            if key == (self.settings.redis_url, self.settings.store_url):
                server = self.request.getfixturevalue("api_server")
            else:
                from cloudai.store import open_store
                from tests.helpers import ServerProc

                store = open_store(settings.store_url)
                server = ServerProc(settings, store, self.request.getfixturevalue("tmp_path")).start()
                self.request.addfinalizer(server.stop)
            self._envs[key] = server.cli_env(server.token(settings.user))
        return self._envs[key]

    def env_for(self, args: tuple[str, ...], settings: Settings | None = None) -> dict[str, str]:
        if self.reads_via_master or changes(args):
            return self.master_env(settings)
        return cli_env(settings or self.settings)


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


Masters = Callable[..., ServerProc]


@pytest.fixture
def masters(settings: Settings, store: SQLiteStore, tmp_path: Path) -> Iterator[Masters]:
    """``masters(CLOUDAI_X="1", ..., settings_=other)``: a real `cloudai server` on this test's store with these
    settings in its environment (stopped after the test)."""
    started: list[ServerProc] = []

    def start(settings_: Settings = settings, **env: str) -> ServerProc:
        server = ServerProc(settings_, store, tmp_path, env=env).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def run(settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``cloudai ARGS`` in this test's session (see :class:`Cli`)."""
    env = _CURRENT[0].env_for(args, settings) if _CURRENT else cli_env(settings)
    return subprocess.run(cloudai(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def submit(settings: Settings, *args: str) -> str:
    """``cloudai submit -q ARGS`` through the master; the task id."""
    result = run(settings, "submit", "-q", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()
