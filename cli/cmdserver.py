"""The command server: one per user and installation, it imports the CLI once and runs each ``cloudai`` command in
a forked child, so that a command costs a fork rather than an interpreter's start (see :mod:`cloudai.cli.launch`).

Processes: the server accepts a connection and forks a *runner* for it (:mod:`cloudai.cli.cmdprocess`), which takes the
launcher's request and file descriptors and forks the *command* child. The runner tells the launcher the child's
pid (its signals go there), waits for the child, and sends its exit status. If the launcher goes away first, the
runner hangs the child up (SIGHUP, then SIGKILL), as closing its terminal would; if the runner dies, the child is
killed. The server itself never touches a request, holds no connection to Redis or the master, and starts no
thread, so that forking it is safe.

What makes a command run in the launcher's own process instead (the server answers ``("local", why)``):
- a command whose click definition says so (:mod:`cloudai.cli.local`: the services, ``login`` and ``cmdserver``);
- a different locale or ``PYTHON*`` variable than the server started with (they decide how Python starts);
- code that changed since the server imported it (``git pull``, ``pip install``), or a launcher whose priority,
  hard limits or groups a child of the server can't have: the server then exits, and the launcher starts a new
  one.

The server exits after ``CLOUDAI_CMDSERVER_IDLE`` seconds (default 3600) without a command, on SIGTERM, on
``cloudai cmdserver stop``, or when its socket is gone.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import math
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from cloudai.cli.cmdprocess import Runner, end_process, reset_signals
from cloudai.cli.cmdwire import PROTOCOL, peer_uid, recv_frame, send_frame, socket_path
from cloudai.cli.local import runs_local

#: imported before the first fork: what the client commands use (the rest a child imports itself; :func:`_warm`
#: loads what they load lazily); the last three: httpx imports them at its first request
PRELOAD = ("cloudai.cli.main", "cloudai.cli.render", "cloudai.cli.client", "cloudai.cli.follow", "cloudai.cli.remote",
           "cloudai.api", "cloudai.logs", "cloudai.logfollow", "cloudai.submission", "cloudai.models",
           "cloudai.settings", "cloudai.store", "cloudai.store.sqlite", "cloudai.store.mongo", "rich.console",
           "rich.table", "pwd", "difflib", "ctypes", "httpcore", "h11", "certifi")
DEFAULT_IDLE_S = 3600.0


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
        self.lock: IO[str] | None = None
        self.pid = os.getpid()
        self._inode = -1

    def serve(self) -> int:
        """Run until idle, stopped or stale; 0, or 1 when another server holds this socket."""
        with open(self.path + ".lock", "a") as lock:
            if not _lock(lock):
                return 1  # another one is running
            self.lock = lock
            # nothing of the process that started us: its directory (we'd keep it busy), its ignored or blocked
            # signals (the children would have them; an ignored SIGCHLD would even reap them before the runner)
            os.chdir("/")
            reset_signals()
            for name in PRELOAD:
                try:
                    importlib.import_module(name)
                except ImportError:  # a client-only install has no direct mode (redis-py, the stores)
                    pass
            _warm()
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
            if pid == 0:  # the runner: none of the server's descriptors but the tally's write end
                for held in (self.listener, self.lock):
                    if held is not None:
                        held.close()
                os.close(self.tally_r)
                end_process(Runner(conn, self.tally_w, self._status, runs_local).run)
            self.runners.add(pid)
            self.served += 1
            return True

    def _status(self, what: str) -> dict[str, Any]:
        """A control request's answer (in a runner: the counts are the server's at its fork, without this one)."""
        if what == "stop":
            os.kill(self.pid, signal.SIGTERM)
        return {"pid": self.pid, "started": self.started, "served": self.served, "commands": self.commands,
                "local": self.local, "running": len(self.runners), "socket": self.path, "python": sys.executable}

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


def _warm() -> None:
    """Load before the first fork what the commands load on first use, through the owners' public API: rich's
    table of emoji codes (its markup looks codes up in each line it renders)."""
    from rich.emoji import Emoji

    Emoji.replace("")


def _lock(lock: Any) -> bool:
    """Take the installation's server lock, waiting for a server that is on its way out (the launcher that found
    it stale starts this one at once; on a loaded machine the old one's exit took over 3 s)."""
    deadline = time.monotonic() + 15.0
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


def control(env: Mapping[str, str], what: str) -> dict[str, Any] | None:
    """Ask this installation's server for its status (``what="status"``) or to stop; None if none is listening."""
    path = socket_path(env)
    if path is None:
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
            send_frame(sock, {"v": PROTOCOL, "control": what})
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
    idle = args.idle if args.idle is not None else idle_seconds(os.environ)
    return Server(path, idle).serve()


def idle_seconds(env: Mapping[str, str]) -> float:
    """``CLOUDAI_CMDSERVER_IDLE`` if it is a positive number of seconds, else the default (an hour)."""
    try:
        value = float(env.get("CLOUDAI_CMDSERVER_IDLE") or DEFAULT_IDLE_S)
    except ValueError:
        return DEFAULT_IDLE_S
    return value if math.isfinite(value) and value > 0 else DEFAULT_IDLE_S


if __name__ == "__main__":
    sys.exit(main())
