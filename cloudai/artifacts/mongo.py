"""The artifact store in MongoDB GridFS (production): the same MongoDB as the task store, bucket
``cloudai_artifacts``. Uploads go through pymongo's :class:`gridfs.GridFSBucket` (chunks of 1 MiB, so memory
stays flat whatever the file's size); the record of each file is its GridFS files document, with the key, size
and SHA-256 under ``metadata`` (``complete`` once the bytes are all there). Listing, usage and removal query the
files and chunks collections GridFS defines (the GridFS specification's layout)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, BinaryIO, cast

import gridfs
import pymongo
from bson import ObjectId
from pymongo.database import Database
from pymongo.errors import PyMongoError

from cloudai.artifacts.base import CHUNK, Artifact, ArtifactKey, ArtifactStore, Digest
from cloudai.errors import StoreUnavailable
from cloudai.models import utcnow

BUCKET = "cloudai_artifacts"


class GridFSArtifacts(ArtifactStore):
    """Files in the GridFS bucket :data:`BUCKET` of ``db``."""

    def __init__(self, db: Database, url: str = "mongodb://") -> None:
        self.url = url
        self.db = db
        self.bucket = gridfs.GridFSBucket(db, bucket_name=BUCKET, chunk_size_bytes=CHUNK)
        self.files = db[f"{BUCKET}.files"]
        self.chunks = db[f"{BUCKET}.chunks"]
        with self._errors():
            self.files.create_index([("metadata.task_id", 1), ("metadata.execution_id", 1), ("metadata.kind", 1)])
            self.files.create_index([("metadata.user_id", 1)])
            self.files.create_index([("uploadDate", 1)])
            self.chunks.create_index([("files_id", 1), ("n", 1)], unique=True)

    @classmethod
    def connect(cls, url: str) -> GridFSArtifacts:
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            url, tz_aware=True, serverSelectionTimeoutMS=5000, uuidRepresentation="standard")
        try:
            db = client.get_default_database(default="cloudai")
        except pymongo.errors.ConfigurationError as exc:
            raise StoreUnavailable(url, exc) from exc
        return cls(db, url)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except PyMongoError as exc:
            raise StoreUnavailable(self.url, exc) from exc

    @staticmethod
    def _filter(task_id: str, execution_id: str | None = None, kind: str | None = None,
                path: str | None = None) -> dict[str, Any]:
        query: dict[str, Any] = {"metadata.task_id": task_id}
        for name, value in (("execution_id", execution_id), ("kind", kind), ("path", path)):
            if value is not None:
                query[f"metadata.{name}"] = value
        return query

    def put(self, key: ArtifactKey, chunks: Iterable[bytes], limit: int | None = None) -> Artifact:
        file_id = ObjectId()
        digest = Digest(limit)
        meta = {"task_id": key.task_id, "execution_id": key.execution_id, "kind": key.kind, "path": key.path,
                "user_id": key.user_id, "complete": False}
        with self._errors():
            upload = self.bucket.open_upload_stream_with_id(file_id, key.path, metadata=meta)
            try:
                for chunk in chunks:
                    digest.add(chunk)
                    upload.write(chunk)
            except BaseException:
                upload.abort()  # its chunks go; nothing of it is listed
                raise
            upload.close()
            artifact = Artifact(key, digest.size, digest.hexdigest, utcnow())
            self.files.update_one({"_id": file_id}, {"$set": {
                "metadata.size": artifact.size, "metadata.sha256": artifact.sha256,
                "metadata.stored_at": artifact.stored_at, "metadata.complete": True}})
            # the file stored there before (a collection that ran again) goes once the new one is complete
            for old in self.files.find({**self._filter(key.task_id, key.execution_id, key.kind, key.path),
                                        "_id": {"$ne": file_id}}, {"_id": 1}):
                self._remove(old["_id"])
        return artifact

    def _remove(self, file_id: Any) -> None:
        self.files.delete_one({"_id": file_id})
        self.chunks.delete_many({"files_id": file_id})

    def find(self, task_id: str, execution_id: str | None = None, kind: str = "output") -> list[Artifact]:
        query = {**self._filter(task_id, execution_id, kind), "metadata.complete": True}
        with self._errors():
            found = [Artifact.from_meta(d["metadata"]) for d in self.files.find(query)]
        return sorted(found, key=lambda a: a.key.path)

    def open(self, artifact: Artifact) -> BinaryIO:
        k = artifact.key
        with self._errors():
            doc = self.files.find_one({**self._filter(k.task_id, k.execution_id, k.kind, k.path),
                                       "metadata.complete": True}, {"_id": 1})
            if doc is None:
                raise FileNotFoundError(k.path)
            try:
                return cast(BinaryIO, self.bucket.open_download_stream(doc["_id"]))
            except gridfs.errors.NoFile:
                raise FileNotFoundError(k.path) from None

    def delete(self, task_id: str, execution_id: str | None = None, kind: str | None = None,
               path: str | None = None) -> int:
        freed = 0
        with self._errors():
            for doc in list(self.files.find(self._filter(task_id, execution_id, kind, path), {"_id": 1, "length": 1})):
                self._remove(doc["_id"])
                freed += int(doc.get("length") or 0)
        return freed

    def usage(self, user_id: str) -> int:
        with self._errors():
            rows = list(self.files.aggregate([
                {"$match": {"metadata.user_id": user_id, "metadata.complete": True}},
                {"$group": {"_id": None, "total": {"$sum": "$length"}}}]))
        return int(rows[0]["total"]) if rows else 0

    def stored_before(self, cutoff: datetime, limit: int = 1000) -> list[str]:
        tasks: list[str] = []
        with self._errors():
            # GridFS's own upload date: a file whose store died midway (never complete) goes too
            for doc in self.files.find({"uploadDate": {"$lt": cutoff}}, {"metadata.task_id": 1}):
                task_id = doc["metadata"]["task_id"]
                if task_id not in tasks:
                    tasks.append(task_id)
                    if len(tasks) >= limit:
                        break
        return tasks

    def ping(self) -> None:
        with self._errors():
            self.db.command("ping")

    def close(self) -> None:
        self.db.client.close()
