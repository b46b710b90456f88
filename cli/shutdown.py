"""How the ``cloudai`` console script ends. A client command (anything but a service) ends with :func:`os._exit`
once its output is flushed: tearing down the interpreter's modules (redis-py, httpx, click, ...) took ~70 ms, a
fifth of a trivial ``submit -f``, and such a command leaves nothing that needs it (each store write is committed
when made, no thread of it is left working, sockets close with the process). A service exits the normal way, so
that its libraries' clean-up runs."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

#: commands that run a service
SERVICES = frozenset({"server", "worker", "beat", "flower"})


@dataclass
class ExitPlan:
    """Set by the ``cli`` group once it knows the command (the console script passes it as click's ``obj``)."""

    fast: bool = False


def exit_status(code: object) -> int:
    """The status :class:`SystemExit` with ``code`` ends a process with (None is 0; a message is printed, and
    is 1)."""
    if not isinstance(code, int | None):
        print(code, file=sys.stderr)
        return 1
    return code or 0


def exit_now(code: object) -> None:
    """End the process with ``code`` as :class:`SystemExit` would, after flushing what it printed, without
    tearing the interpreter down."""
    status = exit_status(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # the reader went away (`| head`): nothing more to say to it
        pass
    os._exit(status)
