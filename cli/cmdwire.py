"""What the ``cloudai`` launcher (:mod:`cloudai.cli.launch`) and the command server (:mod:`cloudai.cli.cmdserver`)
share: where the socket is and how a message is framed. Built-in modules only: the launcher imports this at every
command.

A frame is a 4-byte big-endian length and a :mod:`marshal` payload (both ends are the same interpreter: the
socket's name includes the interpreter's path and version). The launcher sends one request, with its stdin, stdout
and stderr attached (``SCM_RIGHTS``); the server answers ``("pid", N)`` once the command runs in process N, or
``("local", why)`` when this process should run it itself; then ``("exit", code)``, a negative code meaning
"killed by that signal".
"""

from __future__ import annotations

import _socket
import marshal
import os
import sys

TYPE_CHECKING = False  # not typing's: importing typing would cost the launcher ~8 ms
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

PROTOCOL = 1
#: a request (argv and environment) larger than this runs in the launcher's own process
MAX_FRAME = 1 << 20
#: the environment variable that turns the server off ("off") or stops the launcher from starting one ("manual")
SWITCH = "CLOUDAI_CMDSERVER"


def server_off(env: Mapping[str, str]) -> bool:
    """True when ``CLOUDAI_CMDSERVER`` says commands run in their own process (off, 0, no, false)."""
    return env.get(SWITCH, "").lower() in ("off", "0", "no", "false")


def _fnv1a(text: str) -> str:
    value = 0xCBF29CE484222325
    for byte in text.encode("utf-8", "surrogateescape"):
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{value:016x}"


def socket_dir(env: Mapping[str, str]) -> str:
    """``$CLOUDAI_CMDSERVER_DIR``, else ``$XDG_RUNTIME_DIR/cloudai``, else ``/tmp/cloudai-UID``."""
    if env.get("CLOUDAI_CMDSERVER_DIR"):
        return env["CLOUDAI_CMDSERVER_DIR"]
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "cloudai")
    return f"/tmp/cloudai-{os.getuid()}"


def socket_path(env: Mapping[str, str]) -> str | None:
    """The socket of this installation's server (one per interpreter and code tree), in a directory only this
    user can enter; None when that directory isn't safe (someone else's, or open to others) or can't be made."""
    folder = socket_dir(env)
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        info = os.lstat(folder)  # not a symbolic link someone else made, then pointed elsewhere
    except OSError:
        return None
    if info.st_uid != os.getuid() or info.st_mode & 0o170077 != 0o040000:  # a directory, closed to others
        return None
    tree = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(folder, f"cmd-{_fnv1a(sys.executable + chr(0) + sys.version + chr(0) + tree)}.sock")
    return path if len(path.encode()) < 100 else None  # sun_path holds 108 bytes


def peer_uid(sock: _socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket (``SO_PEERCRED``: pid, uid, gid)."""
    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[4:8], sys.byteorder)


def server_argv(path: str | None = None, idle_s: float | None = None) -> list[str]:
    """The command line of a command server (``-P``: not the working directory on sys.path, where a ``cli``
    package must not stand in for ours)."""
    return [sys.executable, "-P", "-m", "cloudai.cli.cmdserver", *(["--socket", path] if path else []),
            *(["--idle", str(idle_s)] if idle_s is not None else [])]


def frame(message: Any) -> bytes:
    """One message as a frame."""
    payload = marshal.dumps(message)
    return len(payload).to_bytes(4, "big") + payload


def send_frame(sock: _socket.socket, message: Any) -> None:
    """Send one framed message."""
    sock.sendall(frame(message))


def _recv_exactly(sock: _socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def recv_frame(sock: _socket.socket, received: bytes = b"") -> Any:
    """The next framed message, or None when the other end closed the connection; ``received``: its first bytes,
    already read (with the descriptors that came with them)."""
    rest = _recv_exactly(sock, 4 - len(received)) if len(received) < 4 else b""
    if rest is None or len(received) > 4:
        return None
    header = received + rest
    size = int.from_bytes(header, "big")
    if size > MAX_FRAME:
        raise OSError(f"a frame of {size} bytes is larger than the command server's limit")
    payload = _recv_exactly(sock, size)
    return None if payload is None else marshal.loads(payload)
