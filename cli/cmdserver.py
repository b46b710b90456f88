"""The command server: one per user and installation, it imports the CLI once and runs each ``cloudai`` command in
a forked child, so that a command costs a fork rather than an interpreter's start (see :mod:`cli.launch`).

Processes: the server accepts a connection and forks a *runner* for it, which takes the launcher's request and
file descriptors and forks the *command* child. The runner tells the launcher the child's pid (its signals go
there), waits for the child, and sends its exit status. If the launcher goes away first, the runner hangs the
child up (SIGHUP), as closing its terminal would. The server itself never touches a request, holds no
connection to Redis or the master, and starts no thread, so that forking it is safe.

What makes a command run in the launcher's own process instead (the server answers ``("local", why)``):
- a service (``server``, ``worker``, ``beat``, ``flower``), ``login`` (its hidden prompt needs the terminal as
  the process's controlling terminal) and ``cmdserver``;
- a different locale or ``PYTHON*`` variable than the server started with (they decide how Python starts);
- code that changed since the server imported it (``git pull``, ``pip install``): the server then exits, and
  the launcher starts a new one.

The server exits after ``CLOUDAI_CMDSERVER_IDLE`` seconds (default 3600) without a command, on SIGTERM, on
``cloudai cmdserver stop``, or when its socket is gone.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from cli.cmdwire import MAX_FRAME, PROTOCOL, peer_uid, recv_frame, send_frame, socket_path
from cli.shutdown import SERVICES

#: imported before the first fork: what the client commands use (the rest a child imports itself)
PRELOAD = ("cli.main", "cli.render", "cli.client", "cli.follow", "cli.remote", "cloudai.api", "cloudai.logs",
           "cloudai.logfollow", "cloudai.submission", "cloudai.models", "cloudai.settings", "cloudai.store",
           "cloudai.store.sqlite", "cloudai.store.mongo", "rich.console", "rich.table", "rich._emoji_codes", "pwd",
           "difflib", "httpcore", "h11", "certifi")  # the last three: httpx imports them at its first request
#: commands that run in the launcher's own process
LOCAL_COMMANDS = SERVICES | {"login", "cmdserver"}  # cli.launch.LOCAL too
#: environment variables that decide how Python starts: a request whose values differ runs in its own process
STARTUP_PREFIXES = ("PYTHON", "LC_")
STARTUP_NAMES = frozenset({"LANG", "LANGUAGE"})
DEFAULT_IDLE_S = 3600.0
#: how long a hung-up command has to end before the runner kills it
HANGUP_GRACE_S = 10.0


@dataclass
class Fingerprint:
    """The size and mtime of every source file the server imported, to notice code that changed under it."""

    files: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def of_modules(cls, modules: Iterable[Any]) -> Fingerprint:
        """Of the loaded modules' files (built-in and frozen modules have none)."""
        found = cls()
        for module in modules:
            path = getattr(module, "__file__", None)
            if isinstance(path, str) and path not in found.files:
                found.files[path] = found._stat(path)
        return found

    @staticmethod
    def _stat(path: str) -> tuple[int, int]:
        try:
            info = os.stat(path)
        except OSError:
            return (-1, -1)
        return (info.st_mtime_ns, info.st_size)

    def changed(self) -> bool:
        """True once any of the files was edited, replaced or removed."""
        return any(self._stat(path) != seen for path, seen in self.files.items())


def startup_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables that decide how Python starts and decodes text."""
    return {k: v for k, v in env.items() if k.startswith(STARTUP_PREFIXES) or k in STARTUP_NAMES}


def command_of(args: list[str]) -> str | None:
    """The command that ``cloudai ARGS`` names (after the group's options), or None if there is none."""
    from cli.main import cli

    try:
        ctx = cli.make_context("cloudai", list(args), resilient_parsing=True)
    except Exception:  # noqa: BLE001 - a command line click can't parse: let it say why, in the child
        return None
    state = vars(ctx)  # click < 8.2 keeps the command's name in protected_args, later ones in _protected_args
    rest = [*state.get("_protected_args", state.get("protected_args", [])), *ctx.args]
    return rest[0] if rest else None


class Server:
    """Accepts connections on ``path`` and forks a runner for each; see the module's docstring."""

    def __init__(self, path: str, idle_s: float) -> None:
        self.path = path
        self.idle_s = idle_s
        self.runners: set[int] = set()
        self.started = time.time()
        self.served = 0  # connections
        self.commands = 0  # commands run here
        self.local = 0  # commands sent back to run in the launcher
        # each runner writes one byte here ("c" ran, "l" local): pipe writes this small are atomic
        self.tally_r, self.tally_w = os.pipe()
        os.set_blocking(self.tally_r, False)
        self.listener: socket.socket | None = None
        self.fingerprint = Fingerprint()
        self._inode = -1

    def serve(self) -> int:
        """Run until idle, stopped or stale; 0, or 1 when another server holds this socket."""
        with open(self.path + ".lock", "a") as lock:
            if not _lock(lock):
                return 1  # another one is running
            for name in PRELOAD:
                importlib.import_module(name)
            self.fingerprint = Fingerprint.of_modules(list(sys.modules.values()))
            signal.signal(signal.SIGTERM, _raise_exit)
            signal.signal(signal.SIGHUP, _raise_exit)
            self._listen()
            try:
                self._loop()
            finally:
                self._unlink()
        return 0

    def _listen(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        os.chmod(self.path, 0o600)
        self.listener.listen(64)
        self._inode = os.stat(self.path).st_ino

    def _unlink(self) -> None:
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass

    def _loop(self) -> None:
        assert self.listener is not None
        last = time.monotonic()
        while True:
            ready, _, _ = select.select([self.listener], [], [], 5.0)
            self._reap()
            if ready:
                conn, _ = self.listener.accept()
                last = time.monotonic()
                if not self._accept(conn):
                    return
                continue
            if self.runners:
                last = time.monotonic()
            elif time.monotonic() - last > self.idle_s or not self._socket_is_ours():
                return

    def _socket_is_ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self._inode
        except OSError:
            return False

    def _accept(self, conn: socket.socket) -> bool:
        """Fork a runner for ``conn``; False when the server must stop (its code changed)."""
        with conn:
            if peer_uid(conn) != os.getuid():
                return True
            if self.fingerprint.changed():
                send_frame(conn, ("local", "stale"))
                return False
            self._count()
            pid = os.fork()
            if pid == 0:
                assert self.listener is not None
                self.listener.close()
                _end_process(lambda: Runner(conn, self).run())
            self.runners.add(pid)
            self.served += 1
            return True

    def _count(self) -> None:
        try:
            tally = os.read(self.tally_r, 65536)
        except BlockingIOError:
            return
        self.commands += tally.count(b"c")
        self.local += tally.count(b"l")

    def _reap(self) -> None:
        for pid in list(self.runners):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.runners.discard(pid)


def _lock(lock: Any) -> bool:
    """Take the installation's server lock, waiting a little for a server that is on its way out (the launcher
    that found it stale starts this one at once)."""
    deadline = time.monotonic() + 3.0
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _end_process(body: Any) -> NoReturn:
    """Run ``body`` in a forked process and end it without the parent's clean-up (atexit, buffered files)."""
    code = 1
    try:
        code = int(body() or 0)
    except BaseException:  # noqa: BLE001 - nothing may return into the server's loop
        traceback.print_exc()
    os._exit(code)


class Runner:
    """Runs one launcher's request: forks the command, passes its pid back, reports how it ended."""

    def __init__(self, conn: socket.socket, server: Server) -> None:
        self.conn = conn
        self.server = server

    def run(self) -> int:
        os.close(self.server.tally_r)
        request, fds = self._receive()
        if request is None:
            return 0
        why = self._why_local(request, fds)
        os.write(self.server.tally_w, b"c" if why is None else b"l")
        if why is not None:
            send_frame(self.conn, ("local", why))
            return 0
        pid = os.fork()
        if pid == 0:
            os.close(self.server.tally_w)
            _end_process(lambda: Command(request, fds, self.conn).run())
        for fd in fds:
            os.close(fd)
        send_frame(self.conn, ("pid", pid))
        send_frame(self.conn, ("exit", self._wait(pid)))
        return 0

    def _receive(self) -> tuple[dict[str, Any] | None, list[int]]:
        data, fds, _, _ = socket.recv_fds(self.conn, 65536, 3)
        if len(data) < 4:
            return None, fds
        size = int.from_bytes(data[:4], "big")
        while len(data) < 4 + size <= 4 + MAX_FRAME:
            chunk = self.conn.recv(4 + size - len(data))
            if not chunk:
                return None, fds
            data += chunk
        import marshal

        request = marshal.loads(data[4:4 + size])
        if isinstance(request, dict) and request.get("control"):
            self._control(str(request["control"]))
            return None, fds
        return request, fds

    def _control(self, what: str) -> None:
        server = self.server
        if what == "stop":
            os.kill(os.getppid(), signal.SIGTERM)
        # the counts are the server's at this runner's fork: they leave this request out
        send_frame(self.conn, ("status", {"pid": os.getppid(), "started": server.started, "served": server.served,
                                          "commands": server.commands, "local": server.local,
                                          "running": len(server.runners), "socket": server.path,
                                          "python": sys.executable}))

    def _why_local(self, request: dict[str, Any], fds: list[int]) -> str | None:
        if request.get("v") != PROTOCOL or len(fds) != 3:
            return "protocol"
        if startup_env(request["env"]) != startup_env(os.environ):
            return "environment"
        if command_of(request["argv"][1:]) in LOCAL_COMMANDS:
            return "command"
        return None

    def _wait(self, pid: int) -> int:
        """The child's exit code (negative: the signal that killed it); hangs it up if the launcher goes."""
        try:
            child: int | None = os.pidfd_open(pid)  # readable once the child has ended (Linux 5.3)
        except (AttributeError, OSError):
            child = None  # then look every 50 ms
        watch = [self.conn.fileno()] + ([child] if child is not None else [])
        deadline = None
        while True:
            timeout = 0.05 if child is None else None
            if deadline is not None:
                timeout = min(timeout or HANGUP_GRACE_S, max(0.0, deadline - time.monotonic()))
            ready, _, _ = select.select(watch, [], [], timeout)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if deadline is not None and time.monotonic() >= deadline:  # the grace after a hang-up is over
                os.kill(pid, signal.SIGKILL)
                deadline = None
            if self.conn.fileno() in ready and not self.conn.recv(1):  # the launcher is gone: as if its
                watch.remove(self.conn.fileno())                      # terminal had closed
                os.kill(pid, signal.SIGHUP)
                deadline = time.monotonic() + HANGUP_GRACE_S
        if child is not None:
            os.close(child)
        return os.waitstatus_to_exitcode(status)


class Command:
    """The forked child: becomes the launcher's process (stdio, argv, environment, directory) and runs the CLI."""

    def __init__(self, request: dict[str, Any], fds: list[int], conn: socket.socket) -> None:
        self.request = request
        self.fds = fds
        self.conn = conn

    def run(self) -> int:
        self.conn.close()
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
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python starts: a closed pipe is BrokenPipeError
        self._stdio(request["streams"])
        sys.argv = list(request["argv"])
        return _as_main()

    @staticmethod
    def _stdio(streams: list[tuple[str, str, bool]]) -> None:
        """Text streams on fds 0-2 as the launcher's own Python made them (encoding, errors, line buffering)."""
        made = [open(fd, "r" if fd == 0 else "w", buffering=1 if lines else -1, encoding=enc, errors=errors,  # noqa: SIM115
                     closefd=False) for fd, (enc, errors, lines) in enumerate(streams)]
        sys.stdin, sys.stdout, sys.stderr = made
        for name, stream in zip(("__stdin__", "__stdout__", "__stderr__"), made, strict=True):
            setattr(sys, name, stream)  # the originals too: some libraries look there for the terminal


def _as_main() -> int:
    """Run :func:`cli.main.main` and end as ``python -m cli.main`` would: its exit code, a traceback, or SIGINT."""
    from cli.main import main

    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        _flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    _flush()
    return code


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def control(env: Mapping[str, str], what: str) -> dict[str, Any] | None:
    """Ask this installation's server for its status (``what="status"``) or to stop; None if none is listening."""
    path = socket_path(env)
    if path is None:
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
            import marshal

            payload = marshal.dumps({"v": PROTOCOL, "control": what})
            sock.sendall(len(payload).to_bytes(4, "big") + payload)
            reply = recv_frame(sock)
        except OSError:
            return None
    return reply[1] if reply and reply[0] == "status" else None


def main(argv: list[str] | None = None) -> int:
    """``python -P -m cli.cmdserver --socket PATH``: what the launcher starts in the background."""
    parser = argparse.ArgumentParser(prog="cloudai-cmdserver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", help="the socket's path  [default: this installation's]")
    parser.add_argument("--idle", type=float, help="seconds without a command before it exits")
    args = parser.parse_args(argv)
    path = args.socket or socket_path(os.environ)
    if path is None:
        parser.error("no safe directory for the socket: set CLOUDAI_CMDSERVER_DIR to a directory only you can use")
    idle = args.idle if args.idle is not None else float(os.environ.get("CLOUDAI_CMDSERVER_IDLE") or DEFAULT_IDLE_S)
    return Server(path, idle).serve()


if __name__ == "__main__":
    sys.exit(main())
