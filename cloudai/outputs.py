"""Results back: the paths a task names with ``--output`` are copied out of its stopped container into the
artifact store before the container is removed, whatever the outcome (completed, failed, timeout, cancelled).

What is copied, exactly: Docker's archive of each path (``docker cp``'s source, read from the container's own
filesystem, running or stopped) is read member by member, and only regular files below that path are stored,
each under its absolute path in the container with its size and SHA-256. Symbolic and hard links are never
followed and never stored (a link to ``/etc/shadow`` in an output directory stores nothing), nor are devices,
pipes or sockets; the log and the task's reason say what was left out. Each ``--output`` is stored whole or
not at all: one that would pass what is left of the per-task cap (``CLOUDAI_OUTPUT_MAX_BYTES``) or of its
user's artifact quota (``CLOUDAI_ARTIFACT_QUOTA_BYTES``) is dropped (what it had stored so far is removed),
and the outputs after it are still collected. The submit checks: absolute paths, no ``..``, never ``/``,
``/proc``, ``/sys`` or ``/dev`` (exit 2)."""

from __future__ import annotations

import contextlib
import io
import logging
import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

from cloudai.errors import RuntimeFailure, ValidationError
from cloudai.models import format_bytes

if TYPE_CHECKING:
    from cloudai.artifacts import Artifact, ArtifactStore
    from cloudai.models import Task
    from cloudai.runtime import DockerRuntime

log = logging.getLogger(__name__)

MAX_OUTPUTS = 16
MAX_OUTPUT_CHARS = 4096
MAX_OUTPUT_FILES = 10_000  # files one task's outputs may hold (each is a record in the store)
RESERVED = ("/proc", "/sys", "/dev")
OUTPUT_FORMS = "use an absolute path in the container, such as /out or /work/model.pt"


def parse_output(text: str) -> str:
    """An output path, checked and normalised; raises :class:`ValidationError` (exit 2) naming what is wrong."""
    if not isinstance(text, str) or not text or len(text) > MAX_OUTPUT_CHARS:
        raise ValidationError("output", text, OUTPUT_FORMS)
    if any(ord(c) < 0x20 or c == "\x7f" for c in text):
        raise ValidationError("output", text, "contains control characters; " + OUTPUT_FORMS)
    if not text.startswith("/"):
        raise ValidationError("output", text, "must be absolute; " + OUTPUT_FORMS)
    if ".." in text.split("/"):
        raise ValidationError("output", text, "may not hold '..'; " + OUTPUT_FORMS)
    path = posixpath.normpath(text)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    if path == "/" or any(path == r or path.startswith(r + "/") for r in RESERVED):
        raise ValidationError("output", text, "name a path of the task's own files, not /, /proc, /sys or /dev")
    return path


def parse_outputs(items: Iterable[str]) -> list[str]:
    """Every output of a task: at most :data:`MAX_OUTPUTS`, none inside another."""
    paths = [parse_output(i) for i in items]
    if len(paths) > MAX_OUTPUTS:
        raise ValidationError("output", f"{len(paths)} outputs", f"a task may have at most {MAX_OUTPUTS}")
    for a in paths:
        for b in paths:
            if a is not b and (a == b or b.startswith(a + "/")):
                raise ValidationError("output", b, f"is already collected with {a}; give each path once")
    return paths


@dataclass
class Collected:
    """What one attempt's outputs came to: the files stored, and what was left out and why."""

    task_id: str
    stored: list[Artifact] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # problems: they go into the task's reason

    @property
    def stored_bytes(self) -> int:
        return sum(a.size for a in self.stored)

    def reason(self) -> str | None:
        return "; ".join(self.notes) or None

    def log_lines(self) -> list[str]:
        """The lines the task's log ends with (before its final status)."""
        files = len(self.stored)
        lines = [f"[cloudai] outputs: {files} file{'s' if files != 1 else ''}, {format_bytes(self.stored_bytes)} "
                 f"stored (`cloudai artifacts {self.task_id}` lists them)"]
        return lines + [f"[cloudai] {note}" for note in self.notes]


class _Budget:
    """Bytes the outputs may still take, and which limit that is (for the message past it)."""

    def __init__(self, cap: int, quota: int, used: int, user: str) -> None:
        self.left: int | None = None
        self.what = ""
        self.quota_bound = False
        if cap:
            self.left, self.what = cap, f"the output cap of {format_bytes(cap)} per task (CLOUDAI_OUTPUT_MAX_BYTES)"
        if quota:
            room = max(0, quota - used)
            if self.left is None or room < self.left:
                self.left = room
                self.quota_bound = True
                self.what = (f"what is left of {user}'s artifact quota ({format_bytes(room)} of "
                             f"{format_bytes(quota)}, CLOUDAI_ARTIFACT_QUOTA_BYTES)")

    def take(self, size: int) -> None:
        if self.left is not None:
            self.left -= size


class _Chunks(io.RawIOBase):
    """A file over an iterator of byte chunks (Docker's archive stream), for :mod:`tarfile`'s stream mode."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._rest = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._rest:
            try:
                self._rest = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._rest))
        buffer[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n


class _Dropped(Exception):
    """This output is not stored (the reason is the message)."""


def collect(runtime: DockerRuntime, container_id: str, task: Task, store: ArtifactStore, cap: int,
            quota: int) -> Collected:
    """Copy ``task.outputs`` out of the stopped container ``container_id`` into ``store`` under this attempt
    (see the module's rules). Never raises for what the container holds; a store that is away is an error."""
    from cloudai.artifacts import ArtifactKey, TooLarge

    result = Collected(task.task_id)
    budget = _Budget(cap, quota, store.usage(task.user_id) if quota else 0, task.user_id)
    files = 0
    for out in task.outputs:
        if budget.quota_bound and budget.left is not None and budget.left <= 0:
            result.notes.append(f"output {out} not stored: {task.user_id}'s artifact quota of {format_bytes(quota)} "
                                "is used up (CLOUDAI_ARTIFACT_QUOTA_BYTES); `cloudai artifacts --delete TASK` "
                                "frees what older tasks stored")
            continue
        stored: list[Artifact] = []
        skipped: list[str] = []
        try:
            try:
                chunks = runtime.get_archive(container_id, out)
            except FileNotFoundError:
                raise _Dropped(f"output {out} not stored: the container has no such path") from None
            base = posixpath.dirname(out)
            with contextlib.closing(chunks), \
                    tarfile.open(fileobj=io.BufferedReader(_Chunks(chunks), 1 << 20), mode="r|") as tar:
                for member in tar:
                    path = posixpath.normpath(posixpath.join(base, member.name))
                    if path != out and not path.startswith(out + "/"):
                        skipped.append(member.name)  # never stored outside its output (a hostile name)
                        continue
                    if member.isdir():
                        continue
                    if not _utf8(path):
                        skipped.append(f"{path.encode('utf-8', 'replace').decode()} (a name that is not UTF-8)")
                        continue
                    if not member.isreg() or member.issparse():
                        kind = "link" if member.issym() or member.islnk() else "special file"
                        skipped.append(f"{path} ({kind})")
                        continue
                    files += 1
                    if files > MAX_OUTPUT_FILES:
                        raise _Dropped(f"output {out} not stored: the outputs hold more than {MAX_OUTPUT_FILES} "
                                       "files; pack them into one archive in the task")
                    data = tar.extractfile(member)
                    assert data is not None  # a regular file
                    key = ArtifactKey(task.task_id, task.execution_id, "output", path, task.user_id)
                    try:
                        artifact = store.put(key, _read(data), budget.left)
                    except TooLarge:
                        raise _Dropped(f"output {out} not stored: it passes {budget.what}") from None
                    budget.take(artifact.size)
                    stored.append(artifact)
        except _Dropped as why:
            for artifact in stored:
                store.delete(task.task_id, task.execution_id, "output", artifact.path)
                budget.take(-artifact.size)
            files -= len(stored)
            result.notes.append(str(why))
            continue
        except (tarfile.TarError, OSError, RuntimeFailure) as exc:  # the engine's archive broke off, a full disk
            for artifact in stored:
                store.delete(task.task_id, task.execution_id, "output", artifact.path)
            log.warning("task %s: output %s could not be copied: %s", task.task_id, out, exc)
            result.notes.append(f"output {out} not stored: it could not be copied ({exc})")
            continue
        if skipped:
            shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
            result.notes.append(f"output {out}: links and special files are not followed or stored: {shown}")
        result.stored.extend(stored)
    return result


def _read(data: IO[bytes], size: int = 1 << 20) -> Iterator[bytes]:
    while True:
        chunk = data.read(size)
        if not chunk:
            return
        yield chunk


def _utf8(text: str) -> bool:
    """Whether a name read from the archive is text (the store keeps names as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
