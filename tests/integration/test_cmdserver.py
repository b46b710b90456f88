"""The ``cloudai`` launcher and its command server (cli/launch.py, cli/cmdserver.py) as a user meets them: real
launcher processes, a real server, a real worker, Redis and Docker; compared with the same command run in its
own process (``CLOUDAI_CMDSERVER=off``)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.cmdserver import command_of, control
from cli.cmdwire import socket_path
from cloudai.settings import Settings
from tests.helpers import ROOT, cli_env, cmdservers_in, wait_for, wait_started
from tests.services import TEST_IMAGE


def launch(*args: str) -> list[str]:
    """The console script's entry point, as ``cloudai`` runs it."""
    return [sys.executable, "-m", "cli.launch", *args]


class CmdServer:
    """A command server in a directory of its own, and the environment that makes launchers use it."""

    def __init__(self, settings: Settings) -> None:
        # short: a socket's path must fit in 108 bytes, and pytest's tmp_path can be long
        self.dir = tempfile.mkdtemp(prefix="cs-", dir="/tmp")
        self.env = cli_env(settings, CLOUDAI_CMDSERVER_DIR=self.dir, CLOUDAI_CMDSERVER="manual")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CmdServer:
        self.proc = subprocess.Popen(launch("cmdserver", "run", "--idle", "300"), cwd=ROOT, env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.status() is not None, 30, 0.05, "the command server to listen")
        return self

    def status(self) -> dict[str, Any] | None:
        return control(self.env, "status")

    def run(self, *args: str, off: bool = False, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        env = {**self.env, **({"CLOUDAI_CMDSERVER": "off"} if off else {}), **kwargs.pop("env", {})}
        return subprocess.run(launch(*args), cwd=kwargs.pop("cwd", ROOT), env=env, capture_output=True, text=True,
                              timeout=kwargs.pop("timeout", 120), **kwargs)

    def stop(self) -> None:
        control(self.env, "stop")
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for pid in cmdservers_in(self.dir):  # one a launcher started by itself
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def cmdserver(settings: Settings) -> Iterator[CmdServer]:
    server = CmdServer(settings)
    yield server
    server.stop()


def _same(result: subprocess.CompletedProcess[str]) -> tuple[int, str, str]:
    """What a user sees, with task ids (they differ between two submits) made equal."""
    def norm(text: str) -> str:
        return re.sub(r"\b[0-9a-f]{12}\b", "ID", text)

    return result.returncode, norm(result.stdout), norm(result.stderr)


def test_commands_through_the_server_print_and_exit_as_in_their_own_process(  # type: ignore[no-untyped-def]
        settings: Settings, workers, cmdserver: CmdServer) -> None:
    workers()
    cmdserver.start()
    followed = ["submit", "-f", "-m", "64m", TEST_IMAGE, "--", "sh", "-c", "echo one; echo two; exit 3"]
    commands = [["--help"], ["submit", "--bogus"], ["status", "nosuch"], followed, ["list", "--status", "failed"]]
    for args in commands:
        own = cmdserver.run(*args, off=True)
        served = cmdserver.run(*args)
        assert _same(served) == _same(own), args
    assert _same(cmdserver.run(*followed))[0] == 3
    state = cmdserver.status()
    assert state is not None and state["commands"] == len(commands) + 1 and state["local"] == 0


def test_each_command_gets_its_own_environment_and_working_directory(cmdserver: CmdServer,
                                                                     tmp_path: Path) -> None:
    cmdserver.start()
    for port in ("1", "2"):  # nothing listens there: the error names the URL this command was given
        result = cmdserver.run("submit", "-q", TEST_IMAGE, "--", "true",
                               env={"CLOUDAI_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
        assert result.returncode != 0 and f"127.0.0.1:{port}" in result.stderr, result.stderr
    result = cmdserver.run("list", cwd=tmp_path, env={"CLOUDAI_STORE_URL": "sqlite:///relative.db"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "relative.db").exists()  # relative to the launcher's directory, not the server's
    state = cmdserver.status()
    assert state is not None and state["commands"] == 3


def test_a_different_python_startup_runs_the_command_in_its_own_process(cmdserver: CmdServer) -> None:
    cmdserver.start()
    result = cmdserver.run("status", "nosuch", env={"PYTHONHASHSEED": "7"})
    assert result.returncode == cmdserver.run("status", "nosuch", off=True).returncode != 0
    state = cmdserver.status()
    assert state is not None and (state["commands"], state["local"]) == (0, 1)
    result = cmdserver.run("worker", "--help")  # a service's commands run in their own process too
    assert result.returncode == 0 and "Run this host as a worker" in result.stdout
    state = cmdserver.status()
    assert state is not None and (state["commands"], state["local"]) == (0, 2)


def test_many_commands_at_once(cmdserver: CmdServer) -> None:
    cmdserver.start()
    env = {**cmdserver.env}
    procs = [subprocess.Popen(launch("status", f"nosuch{i}"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(16)]
    for i, proc in enumerate(procs):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode != 0 and f"nosuch{i}" in err, err
    state = cmdserver.status()
    assert state is not None and state["commands"] == 16


def _running(cmdserver: CmdServer) -> int:
    state = cmdserver.status()
    assert state is not None
    return int(state["running"])


@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_ctrl_c_or_a_killed_launcher_ends_the_command(  # type: ignore[no-untyped-def]
        settings: Settings, store, workers, cmdserver: CmdServer, how: str) -> None:
    workers()
    cmdserver.start()
    task_id = cmdserver.run("submit", "-q", TEST_IMAGE, "--", "sh", "-c", "echo started; sleep 60").stdout.strip()
    wait_started(store, task_id)
    proc = subprocess.Popen(launch("logs", "-f", task_id), cwd=ROOT, env=cmdserver.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "started\n"
    assert _running(cmdserver) == 1
    if how == "sigint":  # what Ctrl-C sends: click's "Aborted!" and exit 1, as in the command's own process
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert (proc.returncode, err.strip()) == (1, "Aborted!")
    else:  # the command server hangs the command up, as closing its terminal would
        proc.kill()
        proc.wait(10)
    wait_for(lambda: _running(cmdserver) == 0, 20, 0.1, "the command to end")


def test_monitor_on_a_terminal_stops_at_a_key_and_restores_the_terminal(  # type: ignore[no-untyped-def]
        settings: Settings, store, workers, cmdserver: CmdServer) -> None:
    workers()
    cmdserver.start()
    task_id = cmdserver.run("submit", "-q", TEST_IMAGE, "--", "sh", "-c", "echo started; sleep 60").stdout.strip()
    wait_started(store, task_id)
    main_fd, tty_fd = os.openpty()
    before = termios.tcgetattr(tty_fd)
    proc = subprocess.Popen(launch("monitor", task_id), cwd=ROOT, env=cmdserver.env, stdin=tty_fd, stdout=tty_fd,
                            stderr=tty_fd, start_new_session=True)
    seen = b""
    deadline = time.monotonic() + 30
    while b"started" not in seen or termios.tcgetattr(tty_fd)[3] & termios.ICANON:  # the watcher's cbreak mode
        assert time.monotonic() < deadline, seen
        seen += _read_some(main_fd)
    os.write(main_fd, b"x")
    assert proc.wait(30) == 0
    seen += _read_some(main_fd)
    assert b"keeps running" in seen, seen
    assert termios.tcgetattr(tty_fd) == before
    state = cmdserver.status()
    assert state is not None and state["commands"] >= 2 and state["local"] == 0
    os.close(main_fd)
    os.close(tty_fd)


def _read_some(fd: int) -> bytes:
    import select

    ready, _, _ = select.select([fd], [], [], 0.2)
    return os.read(fd, 4096) if ready else b""


def test_the_launcher_starts_a_server_and_a_new_one_when_the_code_changes(settings: Settings) -> None:
    server = CmdServer(settings)
    server.env.pop("CLOUDAI_CMDSERVER")  # the default: the launcher starts one when there is none
    source = ROOT / "cli" / "render.py"
    stat = source.stat()
    try:
        assert server.run("status", "nosuch").returncode != 0  # ran in its own process; a server starts
        first = wait_for(server.status, 30, 0.05, "a server to start")
        assert server.run("status", "nosuch").returncode != 0
        assert server.status()["commands"] == 1  # type: ignore[index]
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as an edit or `git pull` would
        result = server.run("status", "nosuch")
        assert result.returncode != 0 and "nosuch" in result.stderr
        second = wait_for(lambda: (s := server.status()) and s["pid"] != first["pid"] and s, 30, 0.05,
                          "a new server")
        assert second["commands"] == 0
        wait_for(lambda: not Path(f"/proc/{first['pid']}").exists() or
                 b"Z" in Path(f"/proc/{first['pid']}/stat").read_bytes().split(b")")[1][:3], 10, 0.05,
                 "the old server to exit")
    finally:
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        server.stop()


def test_a_directory_others_can_enter_is_not_used(tmp_path: Path) -> None:
    folder = tmp_path / "open"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    assert socket_path({"CLOUDAI_CMDSERVER_DIR": str(folder)}) is None
    result = subprocess.run(launch("--help"), cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "CLOUDAI_CMDSERVER_DIR": str(folder)})
    assert result.returncode == 0 and "Usage: cloudai" in result.stdout
    assert os.listdir(folder) == []
    folder.chmod(0o700)
    assert socket_path({"CLOUDAI_CMDSERVER_DIR": str(folder)}) is not None


def test_the_command_is_found_after_the_groups_options() -> None:
    assert command_of(["--redis-url", "redis://x", "worker", "start"]) == "worker"
    assert command_of(["--store-url=sqlite:///x", "submit", "-q", "img"]) == "submit"
    assert command_of(["--help"]) is None
    assert command_of(["login", "http://master"]) == "login"


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
            except (OSError, IndexError):
                continue
    return found


def test_ctrl_z_stops_the_command_with_its_launcher_and_fg_resumes_both(  # type: ignore[no-untyped-def]
        settings: Settings, store, workers, cmdserver: CmdServer) -> None:
    workers()
    cmdserver.start()
    assert cmdserver.proc is not None
    task_id = cmdserver.run("submit", "-q", TEST_IMAGE, "--", "sh", "-c", "echo started; sleep 60").stdout.strip()
    wait_started(store, task_id)
    proc = subprocess.Popen(launch("logs", "-f", task_id), cwd=ROOT, env=cmdserver.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "started\n"
    (runner,) = _children(cmdserver.proc.pid)  # the server runs in the process `cmdserver run` started
    (command,) = _children(runner)
    proc.send_signal(signal.SIGTSTP)
    wait_for(lambda: _state(proc.pid) == "T" and _state(command) == "T", 10, 0.05, "both to stop")
    proc.send_signal(signal.SIGCONT)
    wait_for(lambda: _state(proc.pid) != "T" and _state(command) != "T", 10, 0.05, "both to go on")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert (proc.returncode, err.strip()) == (1, "Aborted!")
