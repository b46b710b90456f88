"""The ``cloudai`` console script: hands the command to the user's command server (:mod:`cli.cmdserver`) when one
is listening, else runs it in this process.

Why: a command run in a fresh interpreter spends ~120 ms of CPU importing click, httpx and CloudAI before it does
~10 ms of work (``docker run``'s whole client is ~23 ms). The command server has imported them once; for each
command it forks a child that takes this process's stdin, stdout and stderr (passed over a Unix socket with
``SCM_RIGHTS``), its argv, environment, working directory and umask, runs :func:`cli.main.main` and reports the exit
status, which this process exits with. Signals sent to this process (Ctrl-C, a terminal hang-up, Ctrl-Z) go to
the child. Mercurial's ``chg`` works the same way.

This module imports only built-in modules, so that it costs the interpreter's start and nothing more. Anything
unexpected before the server has taken the command (no server, a stale one, an odd file descriptor) means the
command runs here, as it always did; ``CLOUDAI_CMDSERVER=off`` makes that the rule.
"""

from __future__ import annotations

import _signal
import _socket
import marshal
import os
import sys

from cli.cmdwire import MAX_FRAME, PROTOCOL, peer_uid, recv_frame, server_off, socket_path

#: commands that always run in the launcher's process (cli.cmdserver.LOCAL_COMMANDS): no server is started for them
LOCAL = ("server", "worker", "beat", "flower", "login", "cmdserver")
#: signals passed on to the command (SIGTSTP/SIGCONT are handled apart: see _suspend)
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH")


def main() -> None:
    """Run ``cloudai`` with ``sys.argv``: through the command server if one takes it, else here."""
    # -X and -W options change how this interpreter runs, which a forked server child would not follow
    if not server_off(os.environ) and sys.argv[1:2] != ["cmdserver"] and not sys._xoptions and not sys.warnoptions:
        code = _through_server()
        if code is not None:
            _exit(code)
    from cli.main import main as run_here

    run_here()


def _exit(code: int) -> None:
    """Exit as the command did: with its code, or by the same signal."""
    if code < 0:
        signum = -code
        _signal.signal(signum, _signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        code = 128 + signum
    os._exit(code)


def _request() -> bytes | None:
    """What the child needs to run this command as this process would, or None if our stdio can't be passed."""
    streams = []
    for fd, stream in enumerate((sys.stdin, sys.stdout, sys.stderr)):
        if stream is None or stream.fileno() != fd:
            return None
        streams.append((stream.encoding, stream.errors, stream.line_buffering))
    umask = os.umask(0o22)
    os.umask(umask)
    return marshal.dumps({"v": PROTOCOL, "argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ),
                          "umask": umask, "streams": streams})


def _connect(path: str) -> _socket.socket | None:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
        if peer_uid(sock) == os.getuid():  # our stdio and environment go only to our own server
            return sock
    except OSError:
        pass
    sock.close()
    return None


def _through_server() -> int | None:
    """The command's exit status (a negative one: killed by that signal), or None to run it here."""
    path = socket_path(os.environ)
    if path is None:
        return None
    sock = _connect(path)
    if sock is None:
        named = [arg for arg in sys.argv[1:3] if not arg.startswith("-")]
        if not (named and named[0] in LOCAL):  # a worker host's `cloudai worker start` needs no server
            _start_server(path)
        return None
    try:
        payload = _request()
        if payload is None or len(payload) > MAX_FRAME:
            return None
        header = len(payload).to_bytes(4, "big")
        fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))
        sent = sock.sendmsg([header + payload], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        if sent < len(header) + len(payload):
            sock.sendall((header + payload)[sent:])
        reply = recv_frame(sock)
        if reply is None or reply[0] != "pid":  # ("local", why): the server can't run this one
            if reply is not None and reply[1] == "stale":
                _start_server(path)
            return None
        return _wait(sock, reply[1])
    except OSError:
        return None  # before the server took the command: run it here
    finally:
        sock.close()


def _wait(sock: _socket.socket, pid: int) -> int:
    """Pass our signals on to the child ``pid`` until the server reports how it ended."""

    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(pid, signum)
        except OSError:
            pass

    def suspend(signum: int, frame: object) -> None:  # Ctrl-Z: stop the child, then ourselves
        forward(_signal.SIGTSTP, frame)
        os.kill(os.getpid(), _signal.SIGSTOP)

    def resume(signum: int, frame: object) -> None:  # fg/bg: let the child go on too
        forward(_signal.SIGCONT, frame)

    for name in FORWARDED:
        _signal.signal(getattr(_signal, name), forward)
    _signal.signal(_signal.SIGTSTP, suspend)
    _signal.signal(_signal.SIGCONT, resume)
    try:
        reply = recv_frame(sock)
    except OSError:
        reply = None
    if reply is None or reply[0] != "exit":
        os.write(2, b"cloudai: lost the command server while the command ran (CLOUDAI_CMDSERVER=off runs commands"
                    b" without it)\n")
        return 1
    return int(reply[1])


def _start_server(path: str) -> None:
    """Start a command server in the background for the next command (this one runs here meanwhile)."""
    if os.environ.get("CLOUDAI_CMDSERVER", "").lower() == "manual":
        return
    try:
        pid = os.fork()
    except OSError:
        return
    if pid:
        os.waitpid(pid, 0)
        return
    try:  # detach: a new session, then a grandchild that no terminal's signals reach
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 1 << 16)
        # -P: not the working directory on sys.path (a `cli` package there must not stand in for ours)
        os.execv(sys.executable, [sys.executable, "-P", "-m", "cli.cmdserver", "--socket", path])
    finally:
        os._exit(1)


if __name__ == "__main__":
    main()
