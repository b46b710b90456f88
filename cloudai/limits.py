"""Bounds on what users may submit, defined once (README: "Bounds"), and the checks of text, ids and image
references that every entry point (CLI, HTTP API) shares through :meth:`cloudai.api.SubmitRequest.validate`."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping

from cloudai.errors import ValidationError

KiB = 1024

# Linux refuses a single argument over 128 KiB (MAX_ARG_STRLEN), so a longer one (a shell line run by
# `/bin/sh -c`, or any one argument) could never start. Larger scripts belong in the image or a file.
MAX_COMMAND_BYTES = 128 * KiB - 1
MAX_ARGS = 4096  # arguments of a task's command
MAX_ARGS_TOTAL_BYTES = 256 * KiB  # all of them: they share the kernel's ARG_MAX with the environment
# The environment and the arguments share the kernel's ARG_MAX (2 MiB with an 8 MiB stack); one variable is
# an argument-sized string too.
MAX_ENV_ENTRIES = 1000
MAX_ENV_VALUE_BYTES = 32 * KiB
MAX_ENV_TOTAL_BYTES = 256 * KiB
MAX_KEY_CHARS = 256  # env, label and constraint keys
MAX_LABELS = 100  # labels and constraints each
MAX_LABEL_VALUE_CHARS = 1024
MAX_NAME_CHARS = 200
MAX_WORKDIR_CHARS = 4096  # PATH_MAX
MAX_IMAGE_CHARS = 512  # Docker: 255 for the name, plus tag and digest
MAX_ID_CHARS = 128  # worker and user ids (a hostname label is 63, a fully qualified name more)
MAX_TIMEOUT_S = 366 * 86400.0
MIN_MEMORY_BYTES = 6 * KiB * KiB  # Docker refuses smaller memory limits
MAX_MEMORY_BYTES = 64 * 1024**4  # 64 TiB (memory and storage): more than any host has; beyond it a typo
MAX_CPUS = 1024.0
MAX_GPUS = 64
MAX_PRIORITY = 1_000_000
MAX_RETRIES = 100
MAX_DEPENDENCIES = 100  # --after ids of one task

# Worker and user ids travel in queue names, Redis keys, container labels and URLs: letters, digits, and
# . _ - (users also @ and +), starting with a letter or digit; never a path (/), a glob (*) or whitespace.
WORKER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
USER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]*")
WORKER_ID_FORMS = f"use up to {MAX_ID_CHARS} letters, digits, '.', '_' or '-', starting with a letter or digit"
USER_ID_FORMS = f"use up to {MAX_ID_CHARS} letters, digits, '.', '_', '@', '+' or '-', starting with a letter or digit"

# Environment variables that CloudAI sets itself and a user may not: the GPUs a task sees are the ones it was
# given (the NVIDIA runtime would otherwise expose every GPU of the host).
RESERVED_ENV = frozenset({"NVIDIA_VISIBLE_DEVICES"})
RESERVED_LABEL_PREFIX = "cloudai."

# Linux capabilities in bit order (CapEff in /proc/self/status is a mask of these).
CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE",
)
# Docker's default set (moby oci/caps/defaults.go)
DOCKER_DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
                       "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE")
# What a task gets unless the operator says otherwise (CLOUDAI_CAP_DROP / CLOUDAI_CAP_ADD): Docker's default
# without NET_RAW (raw sockets let a task spoof packets and sniff on the host's network), i.e. the Kubernetes
# "baseline" Pod Security Standard. Containers are created with every capability dropped and exactly these
# added, so a daemon with another default can't widen it.
DEFAULT_CAPS = tuple(c for c in DOCKER_DEFAULT_CAPS if c != "NET_RAW")


def capabilities(drop: Iterable[str] = (), add: Iterable[str] = ()) -> list[str]:
    """The capabilities a task gets: :data:`DEFAULT_CAPS` less ``drop`` (``ALL``: none) plus ``add``."""
    drop = set(drop)
    kept = set() if "ALL" in drop else set(DEFAULT_CAPS) - drop
    return sorted(kept | set(add), key=CAPABILITIES.index)


# Docker's reference grammar (distribution/reference): [domain[:port]/]path[:tag][@digest]; path components
# are lower case.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]+)?"
_IMAGE_RE = re.compile(
    rf"(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?"
)
IMAGE_FORMS = ("name an image such as busybox, busybox:1.36, ghcr.io/org/app:1.2 or app@sha256:<64 hex digits>; "
               "repository names are lower case")


def text(field: str, value: str, max_chars: int | None = None, max_bytes: int | None = None,
         controls: bool = False) -> str:
    """``value`` if it is valid UTF-8 (no lone surrogates: the CLI receives invalid bytes as those), has no
    NUL byte, no other control characters unless ``controls``, and is within the bounds."""
    if not isinstance(value, str):  # an API body can hold anything
        raise ValidationError(field, value, "must be text")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValidationError(field, value, "is not valid UTF-8; use UTF-8 text") from None
    if "\x00" in value:
        raise ValidationError(field, value, "contains a NUL byte, which no program can receive; remove it")
    if not controls and any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value):
        raise ValidationError(field, value, "contains control characters (such as ESC or a newline); remove them")
    if max_chars is not None and len(value) > max_chars:
        raise ValidationError(field, value, f"is {len(value)} characters; the most is {max_chars}")
    if max_bytes is not None and size > max_bytes:
        raise ValidationError(field, value, f"is {_kib(size)}; the most is {_kib(max_bytes)}")
    return value


def identifier(field: str, value: str, pattern: re.Pattern[str] = WORKER_ID_RE,
               forms: str = WORKER_ID_FORMS) -> str:
    """A worker or user id: ``pattern``, at most :data:`MAX_ID_CHARS`."""
    text(field, value)
    if not value or len(value) > MAX_ID_CHARS or not pattern.fullmatch(value):
        raise ValidationError(field, value, forms)
    return value


def user_id(value: str, field: str = "user") -> str:
    return identifier(field, value, USER_ID_RE, USER_ID_FORMS)


def worker_id(value: str, field: str = "worker") -> str:
    return identifier(field, value)


def image(value: str) -> str:
    """A Docker image reference; a digest must be a complete one (``sha256:`` and 64 hex digits)."""
    text("image", value, max_chars=MAX_IMAGE_CHARS)
    match = _IMAGE_RE.fullmatch(value)
    if not value or match is None:
        raise ValidationError("image", value, IMAGE_FORMS)
    domain = match.group("domain")
    if domain and not ("." in domain or ":" in domain or domain == "localhost") and domain != domain.lower():
        # Docker reads a first component without '.' or ':' as part of the repository, which is lower case
        raise ValidationError("image", value, IMAGE_FORMS)
    digest = match.group("digest")
    if digest and digest.startswith("sha256:") and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ValidationError("image", value, "a sha256 digest is 'sha256:' and 64 lower-case hex digits")
    return value


def env(variables: Mapping[str, str]) -> None:
    """Keys as a shell takes them, values within the bounds, none reserved."""
    if not isinstance(variables, Mapping):
        raise ValidationError("env", variables, "use KEY=VALUE pairs (an object of strings)")
    if len(variables) > MAX_ENV_ENTRIES:
        raise ValidationError("env", f"{len(variables)} variables", f"the most is {MAX_ENV_ENTRIES}")
    total = 0
    for key, value in variables.items():
        text("env key", key, max_chars=MAX_KEY_CHARS)
        if not key or not (key[0].isascii() and (key[0].isalpha() or key[0] == "_")) or not all(
                c.isascii() and (c.isalnum() or c == "_") for c in key):
            raise ValidationError("env", key,
                                  "use KEY=VALUE with KEY made of letters, digits and _ (not starting with a digit)")
        if key in RESERVED_ENV:
            raise ValidationError("env", key, "is set by CloudAI to the task's GPUs; ask for GPUs with --gpus")
        text(f"env {key}", value, max_bytes=MAX_ENV_VALUE_BYTES, controls=True)
        total += len(key.encode()) + len(value.encode()) + 2
    if total > MAX_ENV_TOTAL_BYTES:
        raise ValidationError("env", f"{_kib(total)} in all", f"the most is {_kib(MAX_ENV_TOTAL_BYTES)}")


def args(values: object) -> list[str]:
    """A command's arguments: a list of at most :data:`MAX_ARGS` strings, each one an argument the kernel
    takes, :data:`MAX_ARGS_TOTAL_BYTES` in all."""
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
        raise ValidationError("command", values, "use a list of arguments (strings)")
    if len(values) > MAX_ARGS:
        raise ValidationError("command", f"{len(values)} arguments", f"the most is {MAX_ARGS}")
    total = 0
    for value in values:
        text("command", value, max_bytes=MAX_COMMAND_BYTES, controls=True)
        total += len(value.encode()) + 1
    if total > MAX_ARGS_TOTAL_BYTES:
        raise ValidationError("command", f"{_kib(total)} of arguments", f"the most is {_kib(MAX_ARGS_TOTAL_BYTES)}")
    return list(values)


def key_values(field: str, pairs: Mapping[str, str], reserved_prefix: str | None = None) -> None:
    """Labels and constraints: at most :data:`MAX_LABELS`, single-line keys and values within bounds."""
    if not isinstance(pairs, Mapping):
        raise ValidationError(field, pairs, "use KEY=VALUE pairs (an object of strings)")
    if len(pairs) > MAX_LABELS:
        raise ValidationError(field, f"{len(pairs)} entries", f"the most is {MAX_LABELS}")
    for key, value in pairs.items():
        text(f"{field} key", key, max_chars=MAX_KEY_CHARS)
        if reserved_prefix and key.startswith(reserved_prefix):
            raise ValidationError(field, key, f"keys starting with {reserved_prefix!r} are CloudAI's own")
        text(f"{field} {key}", value, max_chars=MAX_LABEL_VALUE_CHARS)


def reserved_label_prefix(key: str, prefixes: Iterable[str]) -> str | None:
    """The reserved prefix ``key`` starts with (compared without case: the tools that read labels differ),
    or None. Label-driven tools on a worker host (Traefik, Watchtower, Docker Compose...) act on any container
    that carries their labels, so a user's labels may not use their namespaces."""
    low = key.lower()
    return next((p for p in prefixes if p and low.startswith(p.lower())), None)


def whole(field: str, value: object, low: int, high: int) -> int:
    """A whole number from ``low`` to ``high`` (not a bool, not a float)."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValidationError(field, value, f"use a whole number from {low} to {high}")
    return value


def image_allowed(value: str, patterns: Iterable[str]) -> bool:
    """Whether ``value`` (as written) matches one of the glob ``patterns``; no patterns allow every image."""
    patterns = list(patterns)
    return not patterns or any(fnmatch.fnmatchcase(value, p) for p in patterns)


def _kib(size: int) -> str:
    return f"{size} bytes" if size < KiB else f"{size / KiB:.4g} KiB" if size < KiB * KiB else \
        f"{size / KiB / KiB:.4g} MiB"
