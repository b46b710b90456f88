"""The ``cloudai`` console script: hands the command to the user's command server (:mod:`cloudai.cli.cmdserver`)
when one is listening, else runs it in this process.

Why: a command run in a fresh interpreter spends ~120 ms of CPU importing click, httpx and CloudAI before it does
~10 ms of work (``docker run``'s whole client is ~23 ms). The command server has imported them once; for each
command it forks a child that takes this process's stdin, stdout and stderr (passed over a Unix socket with
``SCM_RIGHTS``), its argv, environment, working directory and umask, runs :func:`cloudai.cli.main.main` and reports the
exit status, which this process exits with. Signals sent to this process (Ctrl-C, a terminal hang-up, Ctrl-Z) go to
the child. Mercurial's ``chg`` works the same way.

This module imports only built-in modules, so that it costs the interpreter's start and nothing more. Anything
unexpected before the server has taken the command (no server, a stale one, an odd file descriptor) means the
command runs here, as it always did; ``CLOUDAI_CMDSERVER=off`` makes that the rule.

Which commands always run here (the services, ``login``, ``cmdserver``) only click knows (:mod:`cloudai.cli.local`):
the server asks it for each command. With no server listening, the command runs here anyway, and once the CLI
is imported to run it, click says whether a server should start for the next command (a worker host's
``cloudai worker start`` starts none).
"""

from __future__ import annotations

import _signal
import _socket
import os
import sys

from cloudai.cli.cmdwire import MAX_FRAME, PROTOCOL, frame, peer_uid, recv_frame, server_argv, server_off, socket_path

#: signals passed on to the command; SIGTSTP and SIGCONT are handled apart (see _Forwarder.suspend)
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH")


def main() -> None:
    """Run ``cloudai`` with ``sys.argv``: through the command server if one takes it, else here."""
    start = None
    if _may_use_server():
        code, start = _through_server()
        if code is not None:
            _exit(code)
    from cloudai.cli.local import runs_local  # the CLI is imported here anyway, to run the command
    from cloudai.cli.main import main as run_here

    if start is not None and not runs_local(sys.argv[1:]):
        _start_server(start)
    run_here()


def _may_use_server() -> bool:
    if server_off(os.environ):
        return False
    flags = sys.flags  # -X, -W, -O, -E, -I, -v change how this interpreter runs: a server's child would not
    if sys._xoptions or sys.warnoptions or flags.optimize or flags.ignore_environment or flags.isolated \
            or flags.verbose or flags.dev_mode:
        return False
    # a background job on a terminal (`cloudai monitor ID &`) must meet the terminal's job control (stopped
    # when it reads or changes the terminal): a server's child has no controlling terminal, this process has
    return not _background()


def _exit(code: int) -> None:
    """Exit as the command did: with its code, or by the same signal."""
    if code < 0:
        signum = -code
        _signal.signal(signum, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
        code = 128 + signum
    os._exit(code)


def _request() -> bytes | None:
    """What the child needs to run this command as this process would, framed; None if our stdio can't be
    passed."""
    import resource

    streams = []
    for fd, stream in enumerate((sys.stdin, sys.stdout, sys.stderr)):
        if stream is None or stream.fileno() != fd:
            return None
        streams.append((stream.encoding, stream.errors, stream.line_buffering, getattr(stream, "write_through", False)))
    umask = os.umask(0o22)
    os.umask(umask)
    limits = {getattr(resource, n): resource.getrlimit(getattr(resource, n)) for n in dir(resource)
              if n.startswith("RLIMIT_")}
    return frame({
        "v": PROTOCOL, "argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask,
        "streams": streams, "groups": os.getgroups(), "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "affinity": sorted(os.sched_getaffinity(0)), "rlimits": limits,
        "ignored": [int(s) for s in _signal.valid_signals() if _signal.getsignal(s) == _signal.SIG_IGN],
        "blocked": [int(s) for s in _signal.pthread_sigmask(_signal.SIG_BLOCK, [])],
    })


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


def _through_server() -> tuple[int | None, str | None]:
    """The command's exit status (a negative one: killed by that signal), or None to run it here; and the socket
    a server should start on for the next command (none listens there, or the one there is stale), or None."""
    path = socket_path(os.environ)
    if path is None:
        return None, None
    sock = _connect(path)
    if sock is None:
        return None, path
    forwarder = _Forwarder()  # from here a Ctrl-C waits for the command's pid, or ends this process
    try:
        request = _request()
        if request is None or len(request) > 4 + MAX_FRAME:
            forwarder.local()
            return None, None
        fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))
        sent = sock.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        if sent < len(request):
            sock.sendall(request[sent:])
        reply = recv_frame(sock)
        if reply is None or reply[0] != "pid":  # ("local", why): the server can't run this one
            forwarder.local()
            return None, (path if reply is not None and reply[1] == "stale" else None)
        forwarder.started(reply[1])
        try:
            reply = recv_frame(sock)
        except OSError:
            reply = None
        if reply is None or reply[0] != "exit":
            os.write(2, b"cloudai: lost the command server while the command ran (CLOUDAI_CMDSERVER=off runs"
                        b" commands without it)\n")
            return 1, None
        return int(reply[1]), None
    except OSError:
        forwarder.local()  # before the server took the command: run it here
        return None, None
    finally:
        sock.close()


class _Forwarder:
    """Passes this process's signals on to the command once its pid is known.

    Before that, a signal that ends a process (Ctrl-C, a hang-up) ends this one at once, by that signal: if the
    server has started the command meanwhile, the runner finds us gone and hangs the command up. Ctrl-Z stops
    us at once and the command when it starts; the other signals are kept for the command (or, should it run
    here after all, raised here)."""

    ENDING = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)

    def __init__(self) -> None:
        self.pid = 0
        self.early: list[int] = []
        self.saved: dict[int, object] = {}
        for name in FORWARDED:
            signum = getattr(_signal, name)
            if _signal.getsignal(signum) != _signal.SIG_IGN:  # `nohup`, or a non-interactive shell's `&`
                self.saved[signum] = _signal.signal(signum, self.forward)
        for signum, handler in ((_signal.SIGTSTP, self.suspend), (_signal.SIGCONT, self.resume)):
            if _signal.getsignal(signum) != _signal.SIG_IGN:
                self.saved[signum] = _signal.signal(signum, handler)

    def forward(self, signum: int, frame: object = None) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signum)
            except OSError:
                pass
        elif signum in self.ENDING:
            _exit(-signum)
        else:
            self.early.append(signum)

    def suspend(self, signum: int, frame: object) -> None:
        """Ctrl-Z: stop the command, then this process. SIGSTOP, as the command's process group is orphaned
        (no parent in the terminal's session), and the kernel drops SIGTSTP sent to such a group."""
        self.forward(_signal.SIGSTOP)
        os.kill(os.getpid(), _signal.SIGSTOP)

    def resume(self, signum: int, frame: object) -> None:
        """fg: the command goes on too. bg: as a background job this process would stop at the terminal's
        input, which the command, with no controlling terminal, would not: so both stay stopped until fg."""
        if _background():
            os.kill(os.getpid(), _signal.SIGTTIN)
            return
        self.forward(_signal.SIGCONT)

    def started(self, pid: int) -> None:
        self.pid = pid
        for signum in self.early:
            self.forward(signum)

    def local(self) -> None:
        """Back to this process's own handlers, as the command runs here; a signal that came meanwhile acts."""
        for signum, handler in self.saved.items():
            _signal.signal(signum, handler)  # type: ignore[arg-type]
        for signum in self.early:
            if signum not in (_signal.SIGSTOP, _signal.SIGCONT, _signal.SIGWINCH):
                os.kill(os.getpid(), signum)


def _background() -> bool:
    """True when this process is a background job of the terminal on its stdin."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) != os.getpgrp()
    except OSError:
        return False


def _start_server(path: str) -> None:
    """Start a command server in the background for the next command (this one runs here meanwhile)."""
    if os.environ.get("CLOUDAI_CMDSERVER", "").lower() == "manual":
        return
    try:
        pid = os.fork()
    except OSError:
        return
    if pid:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # SIGCHLD ignored (by whoever started us): the child was reaped already
            pass
        return
    try:  # detach: a new session, then a grandchild that no terminal's signals reach
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 1 << 16)
        os.execv(sys.executable, server_argv(path))
    finally:
        os._exit(1)


if __name__ == "__main__":
    main()
