"""The artifact store's contract: files kept for a task outside its container. Two kinds: ``output``, the files a
task's container left at its ``--output`` paths (stored per attempt, by the worker, before the container is
removed), and ``input``, the directory a submit uploaded (``--upload``, a tar.gz, stored by the master before
the task is recorded). Each is stored under (task, attempt, kind, path) with its size and SHA-256, streamed in
and out in bounded memory. Backends: :mod:`cloudai.artifacts.directory` (one host) and
:mod:`cloudai.artifacts.mongo` (GridFS in the store's MongoDB); one contract suite tests both."""

from __future__ import annotations

import hashlib
import posixpath
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, BinaryIO

from cloudai.errors import CloudAIError
from cloudai.models import as_utc, format_bytes, utcnow

KINDS = ("output", "input")
INPUT_EXECUTION = "input"  # an upload belongs to the task, not to one attempt
UPLOAD_NAME = "upload.tar.gz"  # the path an upload is stored under
CHUNK = 1024 * 1024  # bytes read or written at a time


class TooLarge(CloudAIError):
    """A stored file would pass the limit it was given; nothing of it is kept."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {format_bytes(limit)}")
        self.limit = limit


@dataclass(frozen=True)
class ArtifactKey:
    """Where a file is stored: its task, the attempt that stored it, its kind and its path (an output's absolute
    path in the container), and the user it counts against."""

    task_id: str
    execution_id: str
    kind: str
    path: str
    user_id: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown artifact kind {self.kind!r}")
        if not self.path or "\0" in self.path:
            raise ValueError("an artifact path must be non-empty text without NUL")


@dataclass(frozen=True)
class Artifact:
    """One stored file: its key, its size in bytes and its SHA-256 (hex), and when it was stored."""

    key: ArtifactKey
    size: int
    sha256: str
    stored_at: datetime = field(default_factory=utcnow)

    @property
    def path(self) -> str:
        return self.key.path

    def to_doc(self) -> dict[str, Any]:
        """The public view (the API's listing): no user, no attempt id."""
        return {"path": self.key.path, "size": self.size, "sha256": self.sha256,
                "stored_at": self.stored_at.isoformat()}

    def meta(self) -> dict[str, Any]:
        """Everything a backend keeps beside the bytes."""
        k = self.key
        return {"task_id": k.task_id, "execution_id": k.execution_id, "kind": k.kind, "path": k.path,
                "user_id": k.user_id, "size": self.size, "sha256": self.sha256, "stored_at": self.stored_at}

    @classmethod
    def from_meta(cls, doc: dict[str, Any]) -> Artifact:
        key = ArtifactKey(doc["task_id"], doc["execution_id"], doc["kind"], doc["path"], doc["user_id"])
        return cls(key, int(doc["size"]), str(doc["sha256"]), as_utc(doc["stored_at"]) or utcnow())


class Digest:
    """Size and SHA-256 of bytes as they stream past, held to ``limit`` (None: no limit)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.size = 0
        self._hash = hashlib.sha256()

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.limit is not None and self.size > self.limit:
            raise TooLarge(self.limit)
        self._hash.update(chunk)

    @property
    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def read_chunks(stream: BinaryIO, size: int = CHUNK) -> Iterator[bytes]:
    """A file's bytes in pieces of ``size``."""
    while True:
        chunk = stream.read(size)
        if not chunk:
            return
        yield chunk


def output_path(path: str) -> str:
    """An artifact path as users name it (``/out/model.pt``, ``out/model.pt``): absolute and normalised."""
    return posixpath.normpath("/" + path.lstrip("/"))


class ArtifactStore(ABC):
    """The contract every backend keeps (tests/contract/test_artifact_contract.py)."""

    @abstractmethod
    def put(self, key: ArtifactKey, chunks: Iterable[bytes], limit: int | None = None) -> Artifact:
        """Store the bytes ``chunks`` yields under ``key`` (replacing a file stored there before), computing
        size and SHA-256 as they pass. Past ``limit`` bytes it raises :class:`TooLarge` and keeps nothing. A file
        is listed only once it is stored whole."""

    @abstractmethod
    def find(self, task_id: str, execution_id: str | None = None, kind: str = "output") -> list[Artifact]:
        """A task's files of ``kind`` (of one attempt, or of all), by path."""

    def get(self, task_id: str, execution_id: str, kind: str, path: str) -> Artifact | None:
        """One file's record, or None."""
        return next((a for a in self.find(task_id, execution_id, kind) if a.key.path == path), None)

    @abstractmethod
    def open(self, artifact: Artifact) -> BinaryIO:
        """The stored bytes, readable and seekable (a download resumes at an offset); the caller closes it.
        Raises :class:`FileNotFoundError` when they are gone (removed meanwhile)."""

    @abstractmethod
    def delete(self, task_id: str, execution_id: str | None = None, kind: str | None = None,
               path: str | None = None) -> int:
        """Remove a task's files (of one attempt, kind or path when given); the bytes freed."""

    @abstractmethod
    def usage(self, user_id: str) -> int:
        """The bytes a user's stored files take (the per-user quota counts this)."""

    @abstractmethod
    def stored_before(self, cutoff: datetime, limit: int = 1000) -> list[str]:
        """Ids of tasks with a file stored before ``cutoff`` (retention), at most ``limit``."""

    @abstractmethod
    def ping(self) -> None:
        """Raise :class:`cloudai.errors.StoreUnavailable` when the backend can't be used."""

    def close(self) -> None:  # noqa: B027  (a backend without connections has nothing to release)
        """Release what the backend holds (connections)."""
