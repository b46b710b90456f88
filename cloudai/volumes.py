"""Operator-declared volumes and the mounts users ask for (docs/architecture.md, "Volumes").

A worker's operator declares named host directories (``cloudai worker start --volume data=/srv/datasets:ro``);
a task mounts one by name (``submit --mount data/imagenet:/data:ro``), never by host path. Three parts:

- :class:`Volume`: one declaration, as the worker reads it from its flags or ``CLOUDAI_WORKER_VOLUMES``. Only its
  name and mode are registered (:func:`offer`): placement needs nothing else, and host paths never leave the
  worker host.
- :class:`Mount`: what a task asks for, checked at submit without any host (the name's charset, a sub-path
  without ``..``, an absolute container path). Task records and queue messages carry mounts as their canonical
  text (:attr:`Mount.spec`).
- :func:`resolve`: on the worker, a mount becomes a bind of a real directory inside the volume: the per-user
  directory created on demand, the sub-path resolved with ``realpath`` and then walked again component by
  component with ``O_NOFOLLOW`` (a symbolic link anywhere on the way, or a path leading outside, is refused with
  a :class:`MountRefused` that becomes the task's reason).

Light: no Redis, Docker or store imports (the CLI and the master import it)."""

from __future__ import annotations

import functools
import os
import posixpath
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cloudai.errors import ConfigError, RuntimeFailure, ValidationError

# A name travels in task records, worker records (a MongoDB field name: no '.' or '$'), messages and mount
# specs (no '/' or ':'): letters, digits, '_' and '-', starting with a letter or digit.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
NAME_FORMS = "use up to 64 letters, digits, '_' or '-', starting with a letter or digit (such as datasets)"
USER_PLACEHOLDER = "{user}"
MAX_MOUNTS = 32
MAX_PATH_CHARS = 4096  # PATH_MAX
MOUNT_FORMS = ("use NAME[/SUBPATH]:CONTAINERPATH[:ro|rw], such as data:/data:ro or outputs/run1:/out; NAME is a "
               "volume a worker offers (`cloudai workers` lists them)")
# kernel interfaces and Docker's own mounts: a bind over them would hide or replace what the container relies on
RESERVED_TARGETS = ("/proc", "/sys", "/dev")
READ_ONLY, READ_WRITE = "ro", "rw"
PER_USER = ",per-user"


class MountRefused(RuntimeFailure):
    """A mount the worker will not bind (its volume is not here, a sub-path leads outside it): the task's reason."""


@dataclass(frozen=True)
class Volume:
    """A directory a worker's operator offers to tasks under ``name``. A ``path`` with ``{user}`` (one whole
    component) is per user: each task gets the directory of its own user, created on demand."""

    name: str
    path: str
    read_only: bool = True

    @property
    def per_user(self) -> bool:
        return USER_PLACEHOLDER in self.path

    @property
    def mode(self) -> str:
        """What placement and ``cloudai workers`` see: ``ro`` or ``rw``, and ``,per-user``."""
        return (READ_ONLY if self.read_only else READ_WRITE) + (PER_USER if self.per_user else "")

    @classmethod
    def parse(cls, text: str) -> Volume:
        """``NAME=HOSTPATH[:ro|rw]`` (read-only unless ``:rw``); raises :class:`ConfigError` saying what is wrong."""
        name, sep, rest = text.strip().partition("=")
        if not sep:
            raise ConfigError(f"volume {text!r}: use NAME=HOSTPATH[:ro|rw], such as data=/srv/datasets:ro")
        if not NAME_RE.fullmatch(name):
            raise ConfigError(f"volume name {name!r}: {NAME_FORMS}")
        path, mode = rest, READ_ONLY
        head, colon, tail = rest.rpartition(":")
        if colon:
            if tail not in (READ_ONLY, READ_WRITE):
                raise ConfigError(f"volume {name}: mode {tail!r}: use ro or rw (a host path can't hold ':')")
            path, mode = head, tail
        if not path.startswith("/") or any(c in path for c in ",:\x00") or "\n" in path:
            raise ConfigError(f"volume {name}: host path {path!r}: use an absolute path without ',' or ':'")
        parts = path.split("/")[1:]
        if posixpath.normpath(path) != path or any(p in (".", "..") for p in parts) or path == "/":
            raise ConfigError(f"volume {name}: host path {path!r}: use a normalised absolute path below / "
                              "(no '..', '.', '//' or trailing '/')")
        if path.count(USER_PLACEHOLDER) > 1 or (USER_PLACEHOLDER in path and USER_PLACEHOLDER not in parts):
            raise ConfigError(f"volume {name}: {USER_PLACEHOLDER} must be one whole path component, such as "
                              f"/srv/outputs/{USER_PLACEHOLDER}")
        if "{" in path.replace(USER_PLACEHOLDER, "") or "}" in path.replace(USER_PLACEHOLDER, ""):
            raise ConfigError(f"volume {name}: host path {path!r}: the only placeholder is {USER_PLACEHOLDER}")
        return cls(name, path, read_only=mode == READ_ONLY)

    def check_host(self) -> None:
        """The directory is there (for a per-user volume: the one that holds the users' directories), so a typo
        fails at ``worker start``, not on a user's task."""
        base = self.path.split("/" + USER_PLACEHOLDER)[0] if self.per_user else self.path
        if not os.path.isdir(base):
            raise ConfigError(f"volume {self.name}: {base} is not a directory on this host (the worker must see it "
                              "at the path the Docker engine sees)")

    def root_for(self, user: str) -> str:
        """The host directory a task of ``user`` gets (a user id is one safe path component: limits.USER_ID_RE)."""
        return self.path.replace(USER_PLACEHOLDER, user)


def parse_volumes(items: Iterable[str]) -> dict[str, Volume]:
    """The worker's volumes from ``--volume`` flags and/or ``CLOUDAI_WORKER_VOLUMES`` (comma-separated); a name
    declared twice is an error."""
    out: dict[str, Volume] = {}
    for item in items:
        for text in filter(None, (p.strip() for p in item.split(","))):
            volume = Volume.parse(text)
            if volume.name in out:
                raise ConfigError(f"volume {volume.name} is declared twice")
            out[volume.name] = volume
    return out


def offer(volumes: Mapping[str, Volume]) -> dict[str, str]:
    """What a worker registers: each volume's name and mode, never its host path."""
    return {name: v.mode for name, v in sorted(volumes.items())}


@dataclass(frozen=True)
class Mount:
    """A task's mount of a volume: ``volume``, a ``subpath`` inside it (``''``: the whole volume), where it appears
    in the container and how: ``ro``, ``rw`` (the volume must be writable) or ``''`` (the volume's own mode)."""

    volume: str
    subpath: str
    target: str
    mode: str = ""

    @property
    def spec(self) -> str:
        """The canonical text, as records, messages and ``--mount`` carry it."""
        source = self.volume + ("/" + self.subpath if self.subpath else "")
        return f"{source}:{self.target}" + (f":{self.mode}" if self.mode else "")

    def offered_by(self, volumes: Mapping[str, str]) -> bool:
        """Whether a worker offering ``volumes`` (name -> mode) can bind this mount."""
        mode = volumes.get(self.volume)
        return mode is not None and (self.mode != READ_WRITE or mode.startswith(READ_WRITE))

    def read_only_on(self, volume: Volume) -> bool:
        return self.mode == READ_ONLY or (self.mode == "" and volume.read_only)


@functools.lru_cache(maxsize=4096)
def parse_mount(text: str) -> Mount:
    """A mount from ``NAME[/SUBPATH]:CONTAINERPATH[:ro|rw]``; raises :class:`ValidationError` naming what is wrong.
    A sub-path is relative to the volume and may not hold ``..`` (nor may the container path)."""
    if not isinstance(text, str) or not text or len(text) > 2 * MAX_PATH_CHARS:
        raise ValidationError("mount", text, MOUNT_FORMS)
    if any(ord(c) < 0x20 or c == "\x7f" for c in text):
        raise ValidationError("mount", text, "contains control characters; " + MOUNT_FORMS)
    parts = text.split(":")
    mode = ""
    if len(parts) == 3 and parts[2] in (READ_ONLY, READ_WRITE):
        mode = parts.pop()
    if len(parts) != 2:
        raise ValidationError("mount", text, MOUNT_FORMS)
    source, target = parts
    name, _, sub = source.partition("/")
    if not NAME_RE.fullmatch(name):
        raise ValidationError("mount", text, f"volume name {name!r}: {NAME_FORMS}")
    pieces = [p for p in sub.split("/") if p not in ("", ".")]
    if ".." in pieces:
        raise ValidationError("mount", text, "a sub-path may not hold '..': it must stay inside its volume")
    if not target.startswith("/"):
        raise ValidationError("mount", text, "the container path must be absolute, such as /data")
    if ".." in target.split("/"):
        raise ValidationError("mount", text, "the container path may not hold '..'")
    target = posixpath.normpath(target)
    if target == "/" or any(target == r or target.startswith(r + "/") for r in RESERVED_TARGETS):
        raise ValidationError("mount", text, "mount below / but not on /, /proc, /sys or /dev")
    return Mount(name, "/".join(pieces), target, mode)


def parse_mounts(items: Iterable[str]) -> list[Mount]:
    """Every mount of a task: at most :data:`MAX_MOUNTS`, no container path twice."""
    mounts = [parse_mount(i) for i in items]
    if len(mounts) > MAX_MOUNTS:
        raise ValidationError("mount", f"{len(mounts)} mounts", f"a task may have at most {MAX_MOUNTS}")
    targets = [m.target for m in mounts]
    for target in targets:
        if targets.count(target) > 1:
            raise ValidationError("mount", target, "two mounts use the same container path; give each its own")
    return mounts


def missing_on(volumes: Mapping[str, str], mounts: Iterable[Mount]) -> list[str]:
    """The mounts a worker offering ``volumes`` can't bind, as users read them: ``data`` or ``data (rw)``."""
    return [m.volume + (" (rw)" if m.mode == READ_WRITE and m.volume in volumes else "")
            for m in mounts if not m.offered_by(volumes)]


# -- on the worker ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bind:
    """A host directory (or file) bound into a container."""

    source: str
    target: str
    read_only: bool


def resolve(volumes: Mapping[str, Volume], mount: Mount, user: str, owner: tuple[int, int] | None = None) -> Bind:
    """The bind for ``mount`` of a task of ``user``. A per-user directory (and, in a writable volume, a missing
    sub-path) is created, mode 0700 / 0755, owned by ``owner`` (the task's numeric container user) when given.
    Refused (:class:`MountRefused`): a volume this worker lacks, ``rw`` on a read-only volume, a sub-path that
    does not exist in a read-only volume, or one that leads outside its volume through a symbolic link."""
    volume = volumes.get(mount.volume)
    if volume is None:
        raise MountRefused(f"mount {mount.spec}: this worker offers no volume {mount.volume!r}")
    if mount.mode == READ_WRITE and volume.read_only:
        raise MountRefused(f"mount {mount.spec}: volume {volume.name} is read-only on this worker")
    read_only = mount.read_only_on(volume)
    root = volume.root_for(user)
    if volume.per_user:
        _user_dir(volume, root, owner)
    real_root = os.path.realpath(root)
    if not os.path.isdir(real_root):
        raise MountRefused(f"mount {mount.spec}: volume {volume.name} is not a directory on this worker")
    if not mount.subpath:
        return Bind(real_root, mount.target, read_only)
    wanted = os.path.realpath(os.path.join(real_root, mount.subpath))
    if wanted != real_root and not wanted.startswith(real_root + "/"):
        raise MountRefused(f"mount {mount.spec}: {mount.subpath} leads outside volume {volume.name} (a symbolic "
                           "link); mount a path inside it")
    rel = os.path.relpath(wanted, real_root)
    _walk(real_root, rel.split("/") if rel != "." else [], mount, create=not volume.read_only, owner=owner)
    return Bind(wanted, mount.target, read_only)


def _user_dir(volume: Volume, root: str, owner: tuple[int, int] | None) -> None:
    """Create the user's directory of a per-user volume (0700: no other host user reads it) if it is missing; the
    components above ``{user}`` are the operator's and must exist."""
    base, _, below = volume.path.partition("/" + USER_PLACEHOLDER)
    if not os.path.isdir(base):
        raise MountRefused(f"volume {volume.name}: {base} is not a directory on this worker")
    user_part = root[len(base) + 1:].split("/")[0]
    _walk(os.path.realpath(base), [user_part, *[p for p in below.split("/") if p]], None, create=True,
          owner=owner, mode=0o700)


def _walk(root: str, parts: list[str], mount: Mount | None, create: bool, owner: tuple[int, int] | None,
          mode: int = 0o755) -> None:
    """Open ``parts`` below ``root`` one at a time with ``O_NOFOLLOW`` (creating missing directories when
    ``create``): a component that is a symbolic link is refused even if it appeared after ``realpath`` looked,
    so what is bound is what was checked. Only the last component may be a file."""
    what = f"mount {mount.spec}" if mount else "volume"
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                nxt = os.open(part, os.O_PATH | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise MountRefused(f"{what}: {'/'.join(parts[:i + 1])} does not exist in the volume") from None
                try:
                    os.mkdir(part, mode, dir_fd=fd)
                except FileExistsError:  # created meanwhile: opened (and checked) below
                    pass
                if owner is not None:  # the task's container user writes there (never follows a link)
                    os.chown(part, *owner, dir_fd=fd, follow_symlinks=False)
                nxt = os.open(part, os.O_PATH | os.O_NOFOLLOW, dir_fd=fd)
            info = os.stat(nxt)
            os.close(fd)
            fd = nxt
            if stat.S_ISLNK(info.st_mode):
                raise MountRefused(f"{what}: {'/'.join(parts[:i + 1])} is a symbolic link; mount a real directory")
            if not last and not stat.S_ISDIR(info.st_mode):
                raise MountRefused(f"{what}: {'/'.join(parts[:i + 1])} is not a directory")
            if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
                raise MountRefused(f"{what}: {'/'.join(parts[:i + 1])} is neither a directory nor a regular file")
    finally:
        os.close(fd)
