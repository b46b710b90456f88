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

from cloudai.cli.cmdserver import control
from cloudai.cli.cmdwire import socket_path
from cloudai.settings import Settings
from tests.helpers import ROOT, ServerProc, children_of, cmdservers_in, proc_stat, wait_for, wait_started
from tests.services import TEST_IMAGE


def launch(*args: str) -> list[str]:
    """The console script's entry point, as ``cloudai`` runs it."""
    return [sys.executable, "-m", "cloudai.cli.launch", *args]


class CmdServer:
    """A command server in a directory of its own, and the environment that makes launchers use it."""

    def __init__(self, master: ServerProc, user: str) -> None:
        # short: a socket's path must fit in 108 bytes, and pytest's tmp_path can be long
        self.dir = tempfile.mkdtemp(prefix="cs-", dir="/tmp")
        # a user's commands, through the master
        self.env = master.cli_env(master.token(user), CLOUDAI_CMDSERVER_DIR=self.dir, CLOUDAI_CMDSERVER="manual")
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
        return subprocess.run(launch(*args), cwd=kwargs.pop("cwd", ROOT), env=env, text=True,
                              stdout=kwargs.pop("stdout", subprocess.PIPE), stderr=subprocess.PIPE,
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
def cmdserver(settings: Settings, api_server: ServerProc) -> Iterator[CmdServer]:
    server = CmdServer(api_server, settings.user)
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
    # (`list --json`: the table's "3s ago" could differ between the two runs)
    commands = [["--help"], ["submit", "--bogus"], ["status", "nosuch"], followed,
                ["list", "--status", "failed", "--json"]]
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
                               env={"CLOUDAI_API_URL": f"http://127.0.0.1:{port}"})
        assert result.returncode != 0 and f"127.0.0.1:{port}" in result.stderr, result.stderr
    # an operator's direct read, with a store relative to where the command runs
    result = cmdserver.run("list", cwd=tmp_path, env={"CLOUDAI_API_URL": "", "CLOUDAI_STORE_URL": "sqlite:///relative.db"})
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


def test_the_launcher_starts_a_server_and_a_new_one_when_the_code_changes(settings: Settings,
                                                                         api_server: ServerProc) -> None:
    server = CmdServer(api_server, settings.user)
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
        second = wait_for(lambda: (s := server.status()) and s["pid"] != first["pid"] and s, 90, 0.05,
                          "a new server")
        assert second["commands"] == 0
        wait_for(lambda: _gone(first["pid"]), 10, 0.05,
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


def _state(pid: int) -> str:
    return proc_stat(pid)[0]


def _gone(pid: int) -> bool:
    """Ended: no longer there, or a zombie its parent hasn't reaped yet."""
    try:
        return _state(pid) == "Z"
    except FileNotFoundError:
        return True


def _auto_started(server: CmdServer) -> int:
    """Let a launcher start the server the real way (detached, as a user's first command does); its pid."""
    server.env.pop("CLOUDAI_CMDSERVER", None)
    server.run("--help")
    state = wait_for(server.status, 30, 0.05, "a server to start")
    assert state["pid"] in cmdservers_in(server.dir)  # with its runners: forks, with the same command line
    return int(state["pid"])


def _the_command(server_pid: int) -> int:
    """The one command a server runs now (its runner's child)."""
    (runner,) = wait_for(lambda: children_of(server_pid), 10, 0.05, "a runner")
    (command,) = wait_for(lambda: children_of(runner), 10, 0.05, "the command")
    return command


def _status_field(pid: int, name: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith(name + ":"))


def _following(server: CmdServer, store, **popen: Any) -> tuple[subprocess.Popen[str], str]:  # type: ignore[no-untyped-def]
    task_id = server.run("submit", "-q", TEST_IMAGE, "--", "sh", "-c", "echo started; sleep 60").stdout.strip()
    wait_started(store, task_id)
    proc = subprocess.Popen(launch("logs", "-f", task_id), cwd=ROOT, env=server.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)
    assert proc.stdout is not None and proc.stdout.readline() == "started\n"
    return proc, task_id


def test_ctrl_z_stops_the_command_with_its_launcher_and_fg_resumes_both(  # type: ignore[no-untyped-def]
        settings: Settings, store, workers, cmdserver: CmdServer) -> None:
    workers()
    server_pid = _auto_started(cmdserver)  # its children's process group is orphaned: SIGTSTP would be dropped
    proc, _ = _following(cmdserver, store)
    command = _the_command(server_pid)
    proc.send_signal(signal.SIGTSTP)
    wait_for(lambda: _state(proc.pid) == "T" and _state(command) == "T", 10, 0.05, "both to stop")
    proc.send_signal(signal.SIGCONT)
    wait_for(lambda: _state(proc.pid) != "T" and _state(command) != "T", 10, 0.05, "both to go on")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert (proc.returncode, err.strip()) == (1, "Aborted!")


def _nohup_nice() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    os.nice(3)


def test_the_command_has_the_launchers_ignored_signals_and_priority_and_none_of_the_servers_files(  # type: ignore[no-untyped-def]
        settings: Settings, store, workers, cmdserver: CmdServer) -> None:
    workers()
    server_pid = _auto_started(cmdserver)
    proc, _ = _following(cmdserver, store, preexec_fn=_nohup_nice)  # as `nohup nice -n 3 cloudai logs -f ID`
    command = _the_command(server_pid)
    assert os.getpriority(os.PRIO_PROCESS, command) == os.getpriority(os.PRIO_PROCESS, proc.pid) == 3
    assert int(_status_field(command, "SigIgn"), 16) & (1 << (signal.SIGHUP - 1))
    held = {os.readlink(f"/proc/{command}/fd/{fd}") for fd in os.listdir(f"/proc/{command}/fd")}
    assert not [h for h in held if cmdserver.dir in h], held  # not the server's socket or lock
    proc.send_signal(signal.SIGHUP)  # ignored, as by the launcher itself
    time.sleep(0.5)
    assert proc.poll() is None and _state(command) in "RS"
    # the server can be replaced while a command runs (it held the lock through its children before)
    control(cmdserver.env, "stop")
    wait_for(lambda: _gone(server_pid), 10, 0.05, "stopped")
    cmdserver.run("--help")
    new = wait_for(cmdserver.status, 30, 0.05, "a new server")
    assert new["pid"] != server_pid
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert (proc.returncode, err.strip()) == (1, "Aborted!")


def test_a_server_started_with_sigchld_ignored_still_reports_exit_codes(cmdserver: CmdServer) -> None:
    cmdserver.env.pop("CLOUDAI_CMDSERVER")
    first = subprocess.run(launch("status", "nosuch"), cwd=ROOT, env=cmdserver.env, capture_output=True, text=True,
                           timeout=60, preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN))
    own = cmdserver.run("status", "nosuch", off=True)
    assert (first.returncode, first.stderr) == (own.returncode, own.stderr) != (0, "")
    wait_for(cmdserver.status, 30, 0.05, "a server to start")
    assert _same(cmdserver.run("status", "nosuch")) == _same(own)
    assert cmdserver.status()["commands"] == 1  # type: ignore[index]


def test_unbuffered_output_that_fails_reports_as_in_its_own_process(cmdserver: CmdServer) -> None:
    assert cmdserver.env["PYTHONUNBUFFERED"] == "1"  # the tests' environment, and many images'
    cmdserver.start()
    with open("/dev/full", "w") as full:
        results = [cmdserver.run("--help", off=off, stdout=full) for off in (True, False)]
    assert results[0].returncode == results[1].returncode != 0
    assert results[0].stderr.splitlines()[-1] == results[1].stderr.splitlines()[-1] != ""
    assert cmdserver.status()["commands"] == 1  # type: ignore[index]


def test_a_server_started_by_a_niced_launcher_steps_aside_for_the_next_one(cmdserver: CmdServer) -> None:
    cmdserver.env.pop("CLOUDAI_CMDSERVER")
    niced = subprocess.run(launch("--help"), cwd=ROOT, env=cmdserver.env, capture_output=True, timeout=60,
                           preexec_fn=lambda: os.nice(5))  # `nice -n 5 cloudai ...` as the first command
    assert niced.returncode == 0
    first = wait_for(cmdserver.status, 30, 0.05, "a server to start")
    assert cmdserver.run("--help").returncode == 0  # its child could not be less nice than the server
    second = wait_for(lambda: (s := cmdserver.status()) and s["pid"] != first["pid"] and s, 30, 0.05, "a new one")
    assert cmdserver.run("--help").returncode == 0
    assert cmdserver.status()["commands"] == 1 and second["commands"] == 0  # type: ignore[index]


def test_a_nohup_command_dies_with_its_runner(  # type: ignore[no-untyped-def]
        settings: Settings, store, workers, cmdserver: CmdServer) -> None:
    workers()
    server_pid = _auto_started(cmdserver)
    proc, _ = _following(cmdserver, store, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    command = _the_command(server_pid)
    (runner,) = children_of(server_pid)
    os.kill(runner, signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "lost the command server" in err
    wait_for(lambda: _gone(command), 10, 0.05, "the command to die")
