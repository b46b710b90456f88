"""How a task's container runs, as ``docker run`` runs it: the command rule, the container user, IPC, ulimits
and GPU devices, each parsed from what users type and checked against the operator's bounds. Light (no Redis,
Docker or store imports): the CLI, the master and the worker share it.

**The command rule** (README: "Commands"). What follows the image is the container's argument list: it replaces
the image's CMD and is passed to the image's ENTRYPOINT (``--entrypoint`` replaces that; ``''`` clears it), word
for word as ``docker run IMAGE ARG...`` passes it. No shell is involved unless asked for: ``--shell`` (or the
API's ``command`` given as a string) runs the command line with ``/bin/sh -c``, i.e. the arguments become
``/bin/sh -c 'LINE'``, still through the image's ENTRYPOINT, exactly as ``docker run IMAGE /bin/sh -c 'LINE'``.
The original ``cloudai task WORKER IMAGE ... COMMAND`` syntax keeps its meaning: its command is one shell line
run by ``/bin/sh -c`` in place of the image's entrypoint."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cloudai.errors import ConfigError, ValidationError

SHELL = ("/bin/sh", "-c")


def shell_args(line: str) -> list[str]:
    """The arguments that run ``line`` with ``/bin/sh -c`` (what ``--shell`` and a string ``command`` mean)."""
    return [*SHELL, line]


# -- the container user -----------------------------------------------------------------------------------
_ID = r"(?:[0-9]{1,10}|[A-Za-z_][A-Za-z0-9_.-]{0,31})"
CONTAINER_USER_RE = re.compile(rf"{_ID}(?::{_ID})?")
CONTAINER_USER_FORMS = "use UID[:GID] such as 1000:1000, or a user (and group) name of the image, such as nobody"


def container_user(value: str) -> str:
    """``UID[:GID]`` or ``NAME[:GROUP]``, as ``docker run -u`` takes it."""
    if not isinstance(value, str) or not CONTAINER_USER_RE.fullmatch(value):
        raise ValidationError("container user", value, CONTAINER_USER_FORMS)
    return value


def numeric_owner(value: str | None) -> tuple[int, int] | None:
    """``(uid, gid)`` of a numeric ``UID[:GID]`` (gid defaults to uid), for directories made for the task; None
    for a name (only the image knows it) or none."""
    if not value:
        return None
    uid, _, gid = value.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        return None
    return int(uid), int(gid or uid)


# -- IPC ---------------------------------------------------------------------------------------------------
IPC_MODES = ("private", "shareable", "none", "host")


def ipc_mode(value: str) -> str:
    """One of :data:`IPC_MODES` (never ``container:ID``: a task joins no other task's IPC namespace)."""
    if value not in IPC_MODES:
        raise ValidationError("ipc", value, f"use one of {', '.join(IPC_MODES)} (host only where the operator "
                              "allows it)")
    return value


def ipc_allowed(value: str | None, allow_host: bool) -> str | None:
    """Why ``value`` is not allowed here (``host`` without the operator's CLOUDAI_ALLOW_HOST_IPC), else None."""
    if value == "host" and not allow_host:
        return ("--ipc host shares the host's IPC namespace and is off on this cluster (CLOUDAI_ALLOW_HOST_IPC); "
                "use private or shareable, and --shm-size for a bigger /dev/shm")
    return None


# -- ulimits -----------------------------------------------------------------------------------------------
# Docker's names (setrlimit resources)
ULIMIT_NAMES = ("core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile", "nproc", "rss",
                "rtprio", "rttime", "sigpending", "stack")
UNLIMITED = -1
MAX_ULIMITS = len(ULIMIT_NAMES)
ULIMIT_FORMS = "use NAME=SOFT[:HARD] such as nofile=65536 or memlock=-1 (-1 or unlimited: no limit)"
# what an operator allows unless CLOUDAI_ULIMITS says otherwise: what ML images ask for (NGC: memlock=-1,
# stack=67108864; DataLoader workers: nofile). Locked memory still counts against the task's memory limit.
DEFAULT_ULIMIT_BOUNDS = "nofile=1048576,memlock=unlimited,stack=unlimited"


def _limit(text: str) -> int:
    text = text.strip()
    if text in ("-1", "unlimited"):
        return UNLIMITED
    if not text.isdigit() or len(text) > 19 or int(text) >= 2**63:
        raise ValueError(text)
    return int(text)


@dataclass(frozen=True)
class Ulimit:
    """``--ulimit NAME=SOFT[:HARD]`` (HARD defaults to SOFT; -1 is unlimited)."""

    name: str
    soft: int
    hard: int

    @property
    def spec(self) -> str:
        return f"{self.name}={self.soft}:{self.hard}"

    @classmethod
    def parse(cls, text: str) -> Ulimit:
        if not isinstance(text, str):
            raise ValidationError("ulimit", text, ULIMIT_FORMS)
        name, sep, values = text.partition("=")
        if not sep or name not in ULIMIT_NAMES:
            raise ValidationError("ulimit", text, f"{ULIMIT_FORMS}; names: {', '.join(ULIMIT_NAMES)}")
        soft_text, _, hard_text = values.partition(":")
        try:
            soft = _limit(soft_text)
            hard = _limit(hard_text) if hard_text else soft
        except ValueError:
            raise ValidationError("ulimit", text, ULIMIT_FORMS) from None
        if hard != UNLIMITED and (soft == UNLIMITED or soft > hard):
            raise ValidationError("ulimit", text, "the soft limit can't be above the hard limit")
        return cls(name, soft, hard)


def parse_ulimits(items: Iterable[str]) -> list[Ulimit]:
    """Every ``--ulimit``; a name given twice is an error (which one was meant?)."""
    out = [Ulimit.parse(i) for i in items]
    names = [u.name for u in out]
    for name in names:
        if names.count(name) > 1:
            raise ValidationError("ulimit", name, "is given twice; give each limit once")
    return out


def ulimit_bounds(text: str) -> dict[str, int]:
    """The operator's bounds from ``CLOUDAI_ULIMITS`` (``NAME=MAX,...``, ``unlimited`` allowed): the highest hard
    limit a task may ask for; a name not listed may not be set. Raises :class:`ConfigError`."""
    out: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            if not sep or name not in ULIMIT_NAMES:
                raise ValueError(item)
            out[name] = _limit(value)
        except ValueError:
            raise ConfigError(f"CLOUDAI_ULIMITS: {item!r}: use NAME=MAX (or NAME=unlimited) with NAME one of "
                              f"{', '.join(ULIMIT_NAMES)}") from None
    return out


def ulimits_allowed(ulimits: Iterable[Ulimit], bounds: Mapping[str, int]) -> str | None:
    """Why a ulimit is beyond the operator's bounds, else None."""
    for u in ulimits:
        bound = bounds.get(u.name)
        if bound is None:
            allowed = ", ".join(f"{k}<={'unlimited' if v == UNLIMITED else v}" for k, v in bounds.items()) or "none"
            return f"--ulimit {u.name} is not allowed on this cluster (allowed, CLOUDAI_ULIMITS: {allowed})"
        if bound != UNLIMITED and (u.hard == UNLIMITED or u.hard > bound):
            return f"--ulimit {u.name} may be at most {bound} on this cluster (CLOUDAI_ULIMITS)"
    return None


def bounds_refuse(ulimits: Iterable[str], ipc: str | None, bounds: Mapping[str, int],
                  allow_host_ipc: bool) -> tuple[str, str, str] | None:
    """``(field, value, why)`` when the operator's bounds refuse a task's ulimits (Ulimit specs) or IPC mode, else
    None: the master asks at submit (a usage error), each worker again with its own settings (the task fails)."""
    specs = list(ulimits)
    why = ulimits_allowed([Ulimit.parse(u) for u in specs], bounds)
    if why:
        return "ulimit", ", ".join(specs), why
    why = ipc_allowed(ipc, allow_host_ipc)
    if why:
        return "ipc", str(ipc), why
    return None


# -- GPUs --------------------------------------------------------------------------------------------------
GPU_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
GPU_FORMS = "use a whole number of GPUs (2) or device=ID[,ID...] with ids a worker offers (`cloudai workers`)"


def gpu_devices(value: str) -> list[str] | None:
    """The ids of ``device=ID[,ID...]`` (docker run --gpus' form), or None when ``value`` is a count."""
    text = value.strip().strip('"')
    if not text.startswith("device="):
        return None
    ids = [i.strip() for i in text[len("device="):].split(",")]
    if not ids or not all(GPU_ID_RE.fullmatch(i) for i in ids):
        raise ValidationError("gpus", value, GPU_FORMS)
    if len(set(ids)) != len(ids):
        raise ValidationError("gpus", value, "names a GPU twice; give each id once")
    return ids
