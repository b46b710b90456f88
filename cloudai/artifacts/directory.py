"""The artifact store in a directory of one host (``CLOUDAI_ARTIFACT_DIR``): for a single-host cluster, the demo
and the tests, where the master and the workers see the same directory.

Layout: ``ROOT/<user>/<task>/<attempt>/<kind>/<name>.json`` beside ``<name>.<digest>.data``, where ``name`` is
a hash of the file's path: no path a container or a client chose ever becomes a path on this host. The JSON
record is written (renamed into place) after the bytes, so a file is listed only once it is stored whole, and
a replaced file's new bytes never mix with its old record."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from cloudai.artifacts.base import Artifact, ArtifactKey, ArtifactStore, Digest, TooLarge
from cloudai.errors import StoreUnavailable
from cloudai.models import utcnow

_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]*")  # user, task and attempt ids (cloudai.limits' forms)


def _part(value: str, what: str) -> str:
    """One directory name from an id; anything else (``..``, a slash) is a programming error, never a path."""
    if not _PART.fullmatch(value) or len(value) > 128:
        raise ValueError(f"{what} {value!r} can't name an artifact directory")
    return value


class DirectoryArtifacts(ArtifactStore):
    """Files under ``root`` (created 0700 on first use)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.url = f"dir:{self.root}"
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StoreUnavailable(self.url, f"the artifact directory can't be made ({exc.strerror})") from exc

    def _dir(self, key: ArtifactKey) -> Path:
        return (self.root / _part(key.user_id, "user") / _part(key.task_id, "task")
                / _part(key.execution_id, "attempt") / _part(key.kind, "kind"))

    @staticmethod
    def _name(path: str) -> str:
        return hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:40]

    def put(self, key: ArtifactKey, chunks: Iterable[bytes], limit: int | None = None) -> Artifact:
        folder = self._dir(key)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = self._name(key.path)
        digest = Digest(limit)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    digest.add(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())  # a checkpoint must survive the host's crash once it is listed
            artifact = Artifact(key, digest.size, digest.hexdigest, utcnow())
            blob = f"{name}.{artifact.sha256[:16]}.data"
            os.replace(tmp, folder / blob)
            old = self._record(folder / f"{name}.json")
            self._write_record(folder / f"{name}.json", artifact, blob)
            if old is not None and old[1] != blob:
                (folder / old[1]).unlink(missing_ok=True)
            return artifact
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @staticmethod
    def _write_record(target: Path, artifact: Artifact, blob: str) -> None:
        meta = {**artifact.meta(), "stored_at": artifact.stored_at.isoformat(), "blob": blob}
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".json.part", dir=target.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(meta, out)
        os.replace(tmp, target)

    @staticmethod
    def _record(path: Path) -> tuple[Artifact, str] | None:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            return Artifact.from_meta(doc), str(doc["blob"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError):  # a record being replaced, or damaged: not listed
            return None

    def _records(self, pattern: str, base: Path | None = None) -> Iterator[tuple[Path, Artifact, str]]:
        """The records matching ``pattern`` under ``base`` (default: the root)."""
        for path in (base or self.root).glob(pattern):
            found = self._record(path)
            if found is not None:
                yield path, found[0], found[1]

    def find(self, task_id: str, execution_id: str | None = None, kind: str = "output") -> list[Artifact]:
        pattern = f"*/{_part(task_id, 'task')}/{_part(execution_id, 'attempt') if execution_id else '*'}/{kind}/*.json"
        return sorted((a for _, a, _ in self._records(pattern)), key=lambda a: a.key.path)

    def open(self, artifact: Artifact) -> BinaryIO:
        folder = self._dir(artifact.key)
        found = self._record(folder / f"{self._name(artifact.key.path)}.json")
        if found is None:
            raise FileNotFoundError(artifact.key.path)
        return open(folder / found[1], "rb")

    def delete(self, task_id: str, execution_id: str | None = None, kind: str | None = None,
               path: str | None = None) -> int:
        freed = 0
        for task_dir in self.root.glob(f"*/{_part(task_id, 'task')}"):
            pattern = f"{_part(execution_id, 'attempt') if execution_id else '*'}/{kind or '*'}/"
            pattern += f"{self._name(path)}.json" if path is not None else "*.json"
            for record, artifact, blob in list(self._records(pattern, task_dir)):
                record.unlink(missing_ok=True)
                (record.parent / blob).unlink(missing_ok=True)
                freed += artifact.size
            if path is None and execution_id is None and kind is None:
                shutil.rmtree(task_dir, ignore_errors=True)  # leftovers of writes that died midway too
            else:
                _prune(task_dir)
        return freed

    def usage(self, user_id: str) -> int:
        return sum(a.size for _, a, _ in self._records(f"{_part(user_id, 'user')}/*/*/*/*.json"))

    def stored_before(self, cutoff: datetime, limit: int = 1000) -> list[str]:
        tasks: list[str] = []
        for _, artifact, _ in self._records("*/*/*/*/*.json"):
            if artifact.stored_at < cutoff and artifact.key.task_id not in tasks:
                tasks.append(artifact.key.task_id)
                if len(tasks) >= limit:
                    break
        return tasks

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreUnavailable(self.url, "the artifact directory is not writable")


def _prune(folder: Path) -> None:
    """Remove empty directories under and including ``folder``."""
    for sub in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if sub.is_dir():
            try:
                sub.rmdir()
            except OSError:
                pass
    try:
        folder.rmdir()
    except OSError:
        pass


__all__ = ["DirectoryArtifacts", "TooLarge"]
