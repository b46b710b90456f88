"""Code in: ``submit --upload DIR[:CONTAINERPATH]`` packs a local directory as a tar.gz (leaving out what its
``.cloudaiignore`` or ``.gitignore`` names: :mod:`cloudai.ignorefile`), the master checks and stores it in the
artifact store, and the worker places it in the container before the start (``docker cp``'s way in), at
CONTAINERPATH (default ``/workspace``, also the working directory when the task names none).

Every side checks the archive against the same rules: the sum of its files' sizes at most
``CLOUDAI_UPLOAD_MAX_BYTES`` (the client before anything is sent, exit 2; the master and the worker from the
archive's headers before reading the data, so a tar bomb is refused without unpacking it), at most
:data:`MAX_MEMBERS` entries, no header bigger than 1 MiB, and only regular files, directories and symbolic links
whose names are relative, hold no ``..`` and pass through no link of the archive, and whose link targets are
relative and stay inside it (no hard links, devices, pipes or sparse files). The worker does not hand the stored
archive to Docker: it writes a new one from the checked entries (owned by the task's numeric ``-u`` user, else
root; no set-uid bits). Docker itself unpacks inside the container's own filesystem. Standard library only: the
client imports it."""

from __future__ import annotations

import gzip
import io
import os
import posixpath
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, BinaryIO

from cloudai.errors import ValidationError
from cloudai.ignorefile import IgnoreRules
from cloudai.models import format_bytes

DEFAULT_TARGET = "/workspace"
MAX_MEMBERS = 50_000
MAX_HEADER_BYTES = 1024 * 1024  # a long name or a PAX header: tarfile reads it at once
MAX_NAME_CHARS = 4096
UPLOAD_FORMS = "use DIR[:CONTAINERPATH], such as . or ./src:/workspace (CONTAINERPATH absolute)"
_RESERVED = ("/proc", "/sys", "/dev")


def container_path(text: str) -> str:
    """Where an upload goes in the container: absolute, no ``..``, not ``/``, ``/proc``, ``/sys``, ``/dev``."""
    if not isinstance(text, str) or not text.startswith("/") or len(text) > MAX_NAME_CHARS:
        raise ValidationError("upload", text, "the container path must be absolute, such as /workspace")
    if any(ord(c) < 0x20 or c == "\x7f" for c in text) or ".." in text.split("/"):
        raise ValidationError("upload", text, "the container path may not hold '..' or control characters")
    path = "/" + posixpath.normpath(text).lstrip("/")
    if path == "/" or any(path == r or path.startswith(r + "/") for r in _RESERVED):
        raise ValidationError("upload", text, "place it below / but not on /, /proc, /sys or /dev")
    return path


def parse_upload(text: str) -> tuple[str, str]:
    """``DIR[:CONTAINERPATH]`` as ``(local directory, container path)``."""
    local, sep, target = text.rpartition(":")
    if not sep or not target.startswith("/"):
        local, target = text, DEFAULT_TARGET
    if not local:
        raise ValidationError("upload", text, UPLOAD_FORMS)
    return local, container_path(target)


# -- the client: packing ------------------------------------------------------------------------------------
@dataclass
class Packed:
    """A packed directory: the tar.gz (a temporary file, at its start), what it holds and what was left out."""

    file: BinaryIO
    files: int
    size: int  # the files' bytes
    compressed: int
    ignore_file: str | None
    skipped: int = 0  # entries left out by the ignore rules


def pack(directory: str, max_bytes: int) -> Packed:
    """Pack ``directory`` (see the module's rules); raises :class:`ValidationError` (exit 2) for a directory
    that is missing, past ``max_bytes``, or holds what can't be uploaded (a link leading outside it, a device),
    naming the path and what to do."""
    root = os.path.realpath(directory)
    if not os.path.isdir(root):
        raise ValidationError("upload", directory, "is not a directory")
    rules = IgnoreRules.load(root)
    entries: list[tuple[str, os.stat_result, str | None]] = []  # (relative path, stat, link target)
    size = 0
    skipped = 0
    hint = f"add it to {rules.source or '.cloudaiignore'} in {directory}"

    def walk(folder: str, rel: str) -> None:
        nonlocal size, skipped
        try:
            names = sorted(os.listdir(folder))
        except OSError as exc:
            raise ValidationError("upload", os.path.join(directory, rel), f"can't be read ({exc.strerror})") from None
        for name in names:
            path = os.path.join(folder, name)
            relpath = f"{rel}/{name}" if rel else name
            st = os.lstat(path)
            is_dir = stat.S_ISDIR(st.st_mode)
            if rules.ignored(relpath, is_dir):
                skipped += 1
                continue
            if len(entries) >= MAX_MEMBERS:
                raise ValidationError("upload", directory, f"holds more than {MAX_MEMBERS} files and directories; "
                                      f"leave out what the task does not need ({hint})")
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
                real = os.path.realpath(path)
                if os.path.isabs(target) or not (real == root or real.startswith(root + os.sep)):
                    raise ValidationError("upload", os.path.join(directory, relpath),
                                          f"is a link to {target!r}, outside the directory; {hint}, or copy "
                                          "what it points to into the directory")
                entries.append((relpath, st, target))
            elif is_dir:
                entries.append((relpath, st, None))
                walk(path, relpath)
            elif stat.S_ISREG(st.st_mode):
                size += st.st_size
                if max_bytes and size > max_bytes:
                    raise ValidationError("upload", directory, f"holds more than {format_bytes(max_bytes)} of files "
                                          f"(CLOUDAI_UPLOAD_MAX_BYTES); leave out data and build outputs ({hint}) "
                                          "and give data to tasks through a volume")
                entries.append((relpath, st, None))
            else:
                raise ValidationError("upload", os.path.join(directory, relpath),
                                      f"is a device, pipe or socket, which can't be uploaded; {hint}")

    walk(root, "")
    out = tempfile.TemporaryFile()  # noqa: SIM115  (handed to the caller, who closes it)
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT, compresslevel=6) as tar:
        for relpath, st, target in entries:
            info = tarfile.TarInfo(relpath)
            info.mtime = int(st.st_mtime)
            info.mode = stat.S_IMODE(st.st_mode) & 0o777
            if target is not None:
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
            elif stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                with open(os.path.join(root, relpath), "rb") as fh:
                    info.size = os.fstat(fh.fileno()).st_size  # what is read now, not what was listed
                    tar.addfile(info, fh)
    compressed = out.tell()
    out.seek(0)
    return Packed(out, sum(1 for e in entries if e[2] is None and not stat.S_ISDIR(e[1].st_mode)), size,
                  compressed, rules.source, skipped)


# -- the master and the worker: checking ----------------------------------------------------------------------
class _Bounded(io.RawIOBase):
    """The decompressed archive, held to ``limit`` bytes in all and :data:`MAX_HEADER_BYTES` a read."""

    def __init__(self, inner: gzip.GzipFile, limit: int) -> None:
        self.inner = inner
        self.limit = limit

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.inner.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self.inner.tell() + offset
        if whence not in (io.SEEK_SET, io.SEEK_CUR) or target > self.limit:
            raise _Refused(f"unpacks to more than {format_bytes(self.limit)}")
        return self.inner.seek(target)

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > MAX_HEADER_BYTES:
            raise _Refused(f"has an entry header of more than {format_bytes(MAX_HEADER_BYTES)}")
        data = self.inner.read(size)
        if self.inner.tell() > self.limit:
            raise _Refused(f"unpacks to more than {format_bytes(self.limit)}")
        return data


class _Refused(Exception):
    pass


@dataclass
class UploadSummary:
    """What a checked archive holds."""

    files: int = 0
    dirs: int = 0
    links: dict[str, str] = field(default_factory=dict)  # name -> target
    size: int = 0  # the files' bytes


def _name(member: tarfile.TarInfo) -> str:
    raw = member.name
    if not raw or len(raw) > MAX_NAME_CHARS or raw.startswith("/") or "\0" in raw:
        raise _Refused(f"holds an entry with an absolute or empty name ({raw[:80]!r})")
    if ".." in raw.split("/"):
        raise _Refused(f"holds an entry whose name climbs out with '..' ({raw[:80]!r})")
    name = posixpath.normpath(raw)
    if name in (".", "") or name.startswith("../"):
        raise _Refused(f"holds an entry with an empty name ({raw[:80]!r})")
    return name


def _kind(member: tarfile.TarInfo) -> str:
    if member.issparse():
        return "a sparse file"
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "link"
    if member.islnk():
        return "a hard link"
    if member.isdev():
        return "a device or pipe"
    return "an entry of an unknown type"


def _check_link(name: str, target: str, links: dict[str, str]) -> None:
    """A link's target must be relative and, walked from the link's directory, stay inside the archive without
    passing through another link of it (where lexical ``..`` would no longer mean what it says)."""
    if not target or target.startswith("/") or "\0" in target:
        raise _Refused(f"holds a link {name!r} to an absolute path ({target[:80]!r})")
    parts = name.split("/")[:-1]
    pieces = [p for p in target.split("/") if p not in ("", ".")]
    for i, piece in enumerate(pieces):
        if piece == "..":
            if not parts:
                raise _Refused(f"holds a link {name!r} leading outside it ({target[:80]!r})")
            parts.pop()
            continue
        parts.append(piece)
        if i < len(pieces) - 1 and "/".join(parts) in links:
            raise _Refused(f"holds a link {name!r} whose target passes through another link ({target[:80]!r})")


@contextmanager
def _archive(fileobj: IO[bytes], max_bytes: int) -> Iterator[tarfile.TarFile]:
    """The tar inside a gzip stream, read through :class:`_Bounded`; any failure to read it is a refusal."""
    fileobj.seek(0)
    limit = (max_bytes or 1 << 40) + MAX_MEMBERS * 2048 + MAX_HEADER_BYTES
    try:
        with gzip.GzipFile(fileobj=fileobj, mode="rb") as gz, \
                tarfile.open(fileobj=_Bounded(gz, limit), mode="r:") as tar:  # type: ignore[call-overload]
            yield tar
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise _Refused(f"is not a readable tar.gz archive ({exc})") from None


def _checked(tar: tarfile.TarFile, max_bytes: int, summary: UploadSummary) -> Iterator[tuple[str, tarfile.TarInfo]]:
    """Each entry's normalised name, after its checks (sizes before any data is read)."""
    count = 0
    while True:
        member = tar.next()
        if member is None:
            return
        count += 1
        if count > MAX_MEMBERS:
            raise _Refused(f"holds more than {MAX_MEMBERS} entries")
        name = _name(member)
        kind = _kind(member)
        if kind == "file":
            summary.size += member.size
        if max_bytes and summary.size > max_bytes:
            raise _Refused(f"unpacks to more than {format_bytes(max_bytes)} (CLOUDAI_UPLOAD_MAX_BYTES)")
        if kind not in ("file", "dir", "link"):
            raise _Refused(f"holds {kind} ({name[:80]!r}); only files, directories and links inside it may be uploaded")
        if kind == "link":
            summary.links[name] = member.linkname
        elif kind == "dir":
            summary.dirs += 1
        else:
            summary.files += 1
        yield name, member


def inspect_upload(fileobj: IO[bytes], max_bytes: int) -> UploadSummary:
    """Check an uploaded archive (see the module's rules) without unpacking it; raises :class:`ValidationError`
    (exit 2, HTTP 422) saying what is wrong. ``fileobj`` must be seekable; it is left at its start."""
    summary = UploadSummary()
    names: list[str] = []
    try:
        with _archive(fileobj, max_bytes) as tar:
            names = [name for name, _ in _checked(tar, max_bytes, summary)]
        for name, target in summary.links.items():
            _check_link(name, target, summary.links)
        for name in names:
            parts = name.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in summary.links:
                    raise _Refused(f"holds {name[:80]!r}, inside the link {'/'.join(parts[:i])!r}")
    except _Refused as exc:
        raise ValidationError("upload", "the archive", f"{exc}; it was not stored") from None
    finally:
        fileobj.seek(0)
    return summary


def placement_archive(fileobj: IO[bytes], target: str, owner: tuple[int, int] | None,
                      max_bytes: int) -> tuple[BinaryIO, UploadSummary]:
    """A new tar.gz, to unpack at ``/``, that holds the checked entries of ``fileobj`` below ``target``, owned
    by ``owner`` (uid, gid; else root), without set-uid, set-gid or sticky bits. Raises :class:`ValidationError`
    as :func:`inspect_upload` does."""
    summary = inspect_upload(fileobj, max_bytes)
    uid, gid = owner or (0, 0)
    base = container_path(target).lstrip("/")
    out = tempfile.TemporaryFile()  # noqa: SIM115  (handed to the caller, who closes it)
    try:
        with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT, compresslevel=1) as dest, \
                _archive(fileobj, max_bytes) as tar:
            top = tarfile.TarInfo(base)
            top.type, top.mode, top.uid, top.gid = tarfile.DIRTYPE, 0o755, uid, gid
            dest.addfile(top)
            for name, member in _checked(tar, max_bytes, UploadSummary()):
                info = tarfile.TarInfo(f"{base}/{name}")
                info.mtime, info.uid, info.gid = member.mtime, uid, gid
                if member.issym():
                    info.type, info.linkname, info.mode = tarfile.SYMTYPE, member.linkname, 0o777
                    dest.addfile(info)
                elif member.isdir():
                    info.type, info.mode = tarfile.DIRTYPE, (member.mode & 0o777) | 0o700
                    dest.addfile(info)
                else:
                    info.size, info.mode = member.size, (member.mode & 0o777) | 0o600
                    dest.addfile(info, tar.extractfile(member))
    except _Refused as exc:
        out.close()
        raise ValidationError("upload", "the archive", str(exc)) from None
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out, summary
