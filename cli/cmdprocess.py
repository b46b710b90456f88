"""The two processes a command server forks for each command (:mod:`cloudai.cli.cmdserver`): the *runner*, which takes
the launcher's request, and the *command*, which becomes the launcher's process and runs the CLI.

The command must behave as ``cloudai`` run in the launcher's own process would, so it takes on what that process
had: stdin, stdout and stderr (the file descriptors themselves), argv, the environment, the working directory,
the umask, the signals it ignores and blocks, its priority, CPU affinity and resource limits. What a child of the
server cannot take on (other supplementary groups, a lower nice value or a higher hard limit than the server's)
makes the server step aside: the command runs in the launcher, which starts a new server, as for changed code.
Not taken on: the cgroup, which each terminal of a systemd desktop has its own of.
"""

from __future__ import annotations

import io
import math
import os
import resource
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from cloudai.cli.cmdwire import PROTOCOL, recv_frame, send_frame
from cloudai.cli.shutdown import exit_status

#: environment variables that decide how Python starts: a request whose values differ runs in its own process
STARTUP_PREFIXES = ("PYTHON", "LC_")
STARTUP_NAMES = frozenset({"LANG", "LANGUAGE"})
#: how long a hung-up command has to end before the runner kills it
HANGUP_GRACE_S = 10.0
#: how long a runner waits for a connection's request
REQUEST_TIMEOUT_S = 10.0
#: the signals a command can be told to ignore or block (all but SIGKILL and SIGSTOP)
SETTABLE = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


def end_process(body: Callable[[], int | None]) -> NoReturn:
    """Run ``body`` in a forked process and end it without the parent's clean-up (atexit, buffered files)."""
    code = 1
    try:
        code = int(body() or 0)
    except BaseException:  # noqa: BLE001 - nothing may return into the server's loop
        traceback.print_exc()
    flush()
    os._exit(code)


def flush() -> None:
    """Flush stdout and stderr, which may be gone."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


def reset_signals() -> None:
    """Every signal as a fresh Python process has it (default, SIGINT raising KeyboardInterrupt, SIGPIPE
    ignored) and none blocked, whatever the process that started the server had set."""
    for signum in SETTABLE:
        try:
            signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python starts: a closed pipe is BrokenPipeError
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def startup_env(env: dict[str, str]) -> dict[str, str]:
    """The variables that decide how Python starts and decodes text."""
    return {k: v for k, v in env.items() if k.startswith(STARTUP_PREFIXES) or k in STARTUP_NAMES}


class Runner:
    """Runs one launcher's request: forks the command, passes its pid back, reports how it ended. If the launcher
    goes away, the command is hung up (SIGHUP, then SIGKILL after :data:`HANGUP_GRACE_S`), as if its terminal had
    closed; if the runner dies, the kernel kills the command (``PR_SET_PDEATHSIG``)."""

    def __init__(self, conn: socket.socket, tally: int, status: Callable[[str], dict[str, Any]],
                 runs_local: Callable[[list[str]], bool]) -> None:
        self.conn = conn
        self.tally = tally  # the server's pipe: one byte per request, "c" (ran here) or "l" (sent back)
        self.status = status
        self.runs_local = runs_local  # whether a command line's command runs in the launcher (cli.local)

    def run(self) -> int:
        reset_signals()
        os.setpgid(0, 0)  # its own process group with its command: not killed with the server's group
        request, fds = self._receive()
        if request is None:
            return 0
        why = self._why_local(request, fds)
        os.write(self.tally, b"c" if why is None else b"l")
        if why is not None:
            send_frame(self.conn, ("local", why))
            return 0
        parent = os.getpid()
        # a signal the launcher passes on at once must not reach the command before it runs the CLI (it would
        # end it in its set-up): blocked across the fork, set as the launcher's mask in _as_main
        signal.pthread_sigmask(signal.SIG_BLOCK, SETTABLE)
        pid = os.fork()
        if pid == 0:
            os.close(self.tally)
            end_process(lambda: Command(request, fds, self.conn, parent).run())
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for fd in fds:
            os.close(fd)
        try:
            send_frame(self.conn, ("pid", pid))
            gone = False
        except OSError:  # the launcher went away while we started its command
            gone = True
        code = self._wait(pid, gone)
        try:
            send_frame(self.conn, ("exit", code))
        except OSError:
            pass
        return 0

    def _receive(self) -> tuple[dict[str, Any] | None, list[int]]:
        self.conn.settimeout(REQUEST_TIMEOUT_S)  # a connection that sends nothing must not hold a runner
        try:
            head, fds, _, _ = socket.recv_fds(self.conn, 4, 3)  # the descriptors come with the first bytes
            request = recv_frame(self.conn, head) if head else None
        finally:
            self.conn.settimeout(None)
        if not isinstance(request, dict):
            return None, fds
        if request.get("control"):
            send_frame(self.conn, ("status", self.status(str(request["control"]))))
            return None, fds
        return request, fds

    def _why_local(self, request: dict[str, Any], fds: list[int]) -> str | None:
        """Why this request can't run here, or None."""
        if request.get("v") != PROTOCOL or len(fds) != 3:
            return "protocol"
        if startup_env(request["env"]) != startup_env(dict(os.environ)):
            return "environment"
        # what only root could give a child: the server is the odd one out (started by a `nice`d or limited
        # launcher, or before a group change), so it steps aside for a new one, as for changed code
        raised = any(_limit(hard) > _limit(resource.getrlimit(res)[1]) for res, (_, hard) in request["rlimits"].items())
        if raised or sorted(request["groups"]) != sorted(os.getgroups()) \
                or request["nice"] < os.getpriority(os.PRIO_PROCESS, 0):
            self.status("stop")
            return "stale"
        if self.runs_local(request["argv"][1:]):
            return "command"
        return None

    def _wait(self, pid: int, gone: bool) -> int:
        """The child's exit code (negative: the signal that killed it); hangs it up if the launcher goes."""
        try:
            child: int | None = os.pidfd_open(pid)  # readable once the child has ended (Linux 5.3)
        except (AttributeError, OSError):
            child = None  # then look every 50 ms
        watch = [self.conn.fileno()] + ([child] if child is not None else [])
        deadline = None
        while True:
            if gone and deadline is None and self.conn.fileno() in watch:  # as if its terminal had closed
                watch.remove(self.conn.fileno())
                os.kill(pid, signal.SIGHUP)
                deadline = time.monotonic() + HANGUP_GRACE_S
            timeout = 0.05 if child is None else None
            if deadline is not None:
                timeout = min(timeout or HANGUP_GRACE_S, max(0.0, deadline - time.monotonic()))
            ready, _, _ = select.select(watch, [], [], timeout)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline is not None and time.monotonic() >= deadline:  # the grace after a hang-up is over
                os.kill(pid, signal.SIGKILL)
                deadline = float("inf")
            if self.conn.fileno() in ready:
                try:
                    gone = not self.conn.recv(1)
                except OSError:
                    gone = True
        if child is not None:
            os.close(child)
        return os.waitstatus_to_exitcode(status)


class Command:
    """The forked child: becomes the launcher's process and runs the CLI."""

    def __init__(self, request: dict[str, Any], fds: list[int], conn: socket.socket, runner: int) -> None:
        self.request = request
        self.fds = fds
        self.conn = conn
        self.runner = runner

    def run(self) -> int:
        self.conn.close()
        _die_with_parent(self.runner)
        for target, fd in enumerate(self.fds):
            os.dup2(fd, target)
        for fd in self.fds:
            if fd > 2:
                os.close(fd)
        request = self.request
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        time.tzset()
        self._process(request)
        self._stdio(request["streams"])
        sys.argv = list(request["argv"])
        return _as_main([s for s in request["blocked"] if s in SETTABLE])

    @staticmethod
    def _process(request: dict[str, Any]) -> None:
        """The launcher's signal dispositions, priority, CPU affinity and limits (see the module's docstring)."""
        reset_signals()
        for signum in request["ignored"]:
            if signum in SETTABLE:
                signal.signal(signum, signal.SIG_IGN)
        os.setpriority(os.PRIO_PROCESS, 0, request["nice"])
        os.sched_setaffinity(0, request["affinity"])
        for res, limits in request["rlimits"].items():
            resource.setrlimit(res, limits)

    @staticmethod
    def _stdio(streams: list[tuple[str, str, bool, bool]]) -> None:
        """Text streams on fds 0-2 as the launcher's own Python made them: encoding, errors, line buffering and
        write-through (``PYTHONUNBUFFERED``: no buffer at all), no newline translation."""
        made = []
        for fd, (encoding, errors, lines, through) in enumerate(streams):
            raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
            buffered: Any = raw if through and fd else io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
            made.append(io.TextIOWrapper(buffered, encoding, errors, newline="\n", line_buffering=lines,
                                         write_through=through))
        sys.stdin, sys.stdout, sys.stderr = made
        for name, stream in zip(("__stdin__", "__stdout__", "__stderr__"), made, strict=True):
            setattr(sys, name, stream)  # the originals too: some libraries look there for the terminal


def _limit(value: int) -> float:
    return math.inf if value == resource.RLIM_INFINITY else value


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the runner dies: nothing could report this command's end any more, and a command that
    ignores SIGHUP (``nohup``) must not go on unwatched."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGKILL)


def _as_main(blocked: list[int]) -> int:
    """Run :func:`cloudai.cli.main.main` and end as ``python -m cloudai.cli.main`` would: its exit code, a traceback,
    or SIGINT. Signals held back since the fork arrive here, with the launcher's own mask."""
    from cloudai.cli.main import main

    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        main()
        code = 0
    except SystemExit as exc:
        code = exit_status(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    flush()
    return code
