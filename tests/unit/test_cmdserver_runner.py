"""How a command server's runner waits for its command (cli/cmdserver.py ``Runner._wait``), on real child
processes: the exit status or the signal that ended it, and a hang-up once the launcher's connection closes,
with and without ``pidfd_open`` (kernels before 5.3 lack it)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from cloudai.cli.cmdprocess import Runner


@pytest.fixture(params=["pidfd", "polling"])
def runner(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Runner, socket.socket]]:
    if request.param == "polling":
        monkeypatch.delattr(os, "pidfd_open")
    ours, launcher = socket.socketpair()
    read, write = os.pipe()
    yield Runner(ours, write, lambda what: {}, lambda args: False), launcher
    for sock in (ours, launcher):
        sock.close()
    for fd in (read, write):
        os.close(fd)


def _child(code: str) -> int:
    return subprocess.Popen([sys.executable, "-c", code]).pid  # waited for by the runner, not by Popen


def test_the_exit_code_of_the_command(runner: tuple[Runner, socket.socket]) -> None:
    wait, _ = runner
    assert wait._wait(_child("raise SystemExit(7)"), False) == 7


def test_a_command_killed_by_a_signal_reports_it_negated(runner: tuple[Runner, socket.socket]) -> None:
    wait, _ = runner
    assert wait._wait(_child("import os, signal; os.kill(os.getpid(), signal.SIGTERM)"), False) == -signal.SIGTERM


def test_a_gone_launcher_hangs_the_command_up(runner: tuple[Runner, socket.socket]) -> None:
    wait, launcher = runner
    pid = _child("import time; time.sleep(60)")
    launcher.close()
    assert wait._wait(pid, False) == -signal.SIGHUP


def test_a_launcher_gone_before_the_pid_reached_it_hangs_the_command_up(runner: tuple[Runner, socket.socket]) -> None:
    wait, _ = runner
    assert wait._wait(_child("import time; time.sleep(60)"), True) == -signal.SIGHUP


def test_a_command_that_ignores_the_hang_up_is_killed_after_the_grace(
        runner: tuple[Runner, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cloudai.cli.cmdprocess.HANGUP_GRACE_S", 0.3)
    wait, launcher = runner
    read, write = os.pipe()
    pid = subprocess.Popen([sys.executable, "-c", "import os, signal, time; signal.signal(signal.SIGHUP, "
                            f"signal.SIG_IGN); os.write({write}, b'x'); time.sleep(60)"], pass_fds=[write]).pid
    assert os.read(read, 1) == b"x"  # it ignores SIGHUP from here on
    launcher.close()
    assert wait._wait(pid, False) == -signal.SIGKILL
    os.close(read)
    os.close(write)


def test_the_commands_that_run_in_the_launchers_own_process_say_so_in_their_click_definitions() -> None:
    """cli/local.py: the services (which also exit the slow way, cli/shutdown.py), login and cmdserver."""
    import click

    from cloudai.cli.local import Local, runs_local
    from cloudai.cli.main import cli
    from cloudai.cli.shutdown import SERVICES

    ctx = click.Context(cli)
    local = {name for name in cli.list_commands(ctx) if isinstance(cli.get_command(ctx, name), Local)}
    assert local == SERVICES | {"login", "cmdserver"}
    assert runs_local(["worker", "start", "--id", "w1"]) and runs_local(["cmdserver", "stop"])
    assert not runs_local(["submit", "img"]) and not runs_local(["nosuch"]) and not runs_local([])


def test_the_command_is_found_after_the_groups_options() -> None:
    from cloudai.cli.local import runs_local

    assert runs_local(["--redis-url", "redis://x", "worker", "start"])
    assert not runs_local(["--store-url=sqlite:///x", "submit", "-q", "img"])
    assert not runs_local(["--redis-url", "worker"])  # the option's value, not the command
    assert not runs_local(["--help"])
    assert runs_local(["login", "http://master"])
