"""One contract for every artifact store backend: a directory, GridFS on mongomock, and GridFS on a real MongoDB
when CLOUDAI_TEST_MONGO_URL is set. Files go in streamed, come back byte for byte with their size and SHA-256,
per task, attempt, kind and path; a file past its limit, or whose stream broke, leaves nothing behind."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import mongomock
import mongomock.gridfs
import pytest

from cloudai.artifacts import ArtifactKey, ArtifactStore, TooLarge, open_artifacts
from cloudai.artifacts.directory import DirectoryArtifacts
from cloudai.artifacts.mongo import GridFSArtifacts
from cloudai.models import utcnow
from cloudai.settings import Settings

BACKENDS = ["directory", "gridfs-mongomock"] + (["gridfs-mongodb"] if os.environ.get("CLOUDAI_TEST_MONGO_URL") else [])
MiB = 1024 * 1024


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ArtifactStore]:
    if request.param == "directory":
        store: ArtifactStore = DirectoryArtifacts(tmp_path / "artifacts")
    elif request.param == "gridfs-mongomock":
        mongomock.gridfs.enable_gridfs_integration()  # gridfs then takes mongomock's databases too
        store = GridFSArtifacts(mongomock.MongoClient(tz_aware=True)["cloudai_test"], "mongodb://mongomock")
    else:
        url = os.environ["CLOUDAI_TEST_MONGO_URL"].rstrip("/") + f"/cloudai_art_{uuid.uuid4().hex[:8]}"
        store = open_artifacts(Settings(store_url=url))
        assert isinstance(store, GridFSArtifacts)
    yield store
    if request.param == "gridfs-mongodb":
        assert isinstance(store, GridFSArtifacts)
        store.db.client.drop_database(store.db.name)
    store.close()


def key(path: str = "/out/model.pt", task: str = "t1", execution: str = "0001-aaaa", kind: str = "output",
        user: str = "ana") -> ArtifactKey:
    return ArtifactKey(task, execution, kind, path, user)


def pieces(data: bytes, size: int = 65536) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def read_all(store: ArtifactStore, task: str, path: str, execution: str = "0001-aaaa", offset: int = 0) -> bytes:
    found = store.get(task, execution, "output", path)
    assert found is not None
    with store.open(found) as stream:
        stream.seek(offset)
        return stream.read()


def test_a_file_round_trips_with_its_size_and_digest(backend: ArtifactStore) -> None:
    data = os.urandom(3 * MiB + 5)  # several chunks, the last a short one
    stored = backend.put(key(), pieces(data))
    assert (stored.size, stored.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    [listed] = backend.find("t1", "0001-aaaa")
    assert (listed.path, listed.size, listed.sha256) == ("/out/model.pt", len(data), stored.sha256)
    assert listed.stored_at.tzinfo is not None
    assert read_all(backend, "t1", "/out/model.pt") == data
    assert read_all(backend, "t1", "/out/model.pt", offset=2 * MiB + 7) == data[2 * MiB + 7:]  # a resumed download
    assert listed.to_doc() == {"path": "/out/model.pt", "size": len(data), "sha256": stored.sha256,
                               "stored_at": listed.stored_at.isoformat()}


def test_files_are_kept_per_task_attempt_kind_and_path(backend: ArtifactStore) -> None:
    backend.put(key("/out/b"), [b"b1"])
    backend.put(key("/out/a"), [b"a1"])
    backend.put(key("/out/a", execution="0002-bbbb"), [b"a2"])
    backend.put(key("upload.tar.gz", execution="input", kind="input"), [b"code"])
    backend.put(key("/out/a", task="t2"), [b"other"])
    assert [a.path for a in backend.find("t1", "0001-aaaa")] == ["/out/a", "/out/b"]  # by path
    assert [a.size for a in backend.find("t1", "0002-bbbb")] == [2]
    assert sorted(a.key.execution_id for a in backend.find("t1")) == ["0001-aaaa", "0001-aaaa", "0002-bbbb"]
    assert [a.path for a in backend.find("t1", kind="input")] == ["upload.tar.gz"]
    assert backend.get("t1", "0001-aaaa", "output", "/out/none") is None
    assert read_all(backend, "t1", "/out/a", "0002-bbbb") == b"a2"


def test_a_file_stored_again_replaces_the_first(backend: ArtifactStore) -> None:
    backend.put(key(), [b"old bytes"])
    backend.put(key(), [b"new"])
    [listed] = backend.find("t1", "0001-aaaa")
    assert (listed.size, read_all(backend, "t1", "/out/model.pt")) == (3, b"new")
    assert backend.usage("ana") == 3


def test_past_its_limit_nothing_of_a_file_is_kept(backend: ArtifactStore) -> None:
    assert backend.put(key("/out/fits"), pieces(b"x" * 1000, 100), limit=1000).size == 1000  # at the limit: kept
    with pytest.raises(TooLarge) as past:
        backend.put(key("/out/big"), pieces(b"x" * 5000, 100), limit=1000)
    assert past.value.limit == 1000
    assert [a.path for a in backend.find("t1")] == ["/out/fits"]
    assert backend.usage("ana") == 1000


def test_a_stream_that_breaks_leaves_nothing(backend: ArtifactStore) -> None:
    def broken() -> Iterator[bytes]:
        yield b"some"
        raise OSError("the container's archive broke off")

    with pytest.raises(OSError):
        backend.put(key(), broken())
    assert backend.find("t1") == []
    assert backend.usage("ana") == 0


def test_removal_by_path_attempt_kind_or_task_frees_its_bytes(backend: ArtifactStore) -> None:
    backend.put(key("/out/a"), [b"1" * 10])
    backend.put(key("/out/b"), [b"2" * 20])
    backend.put(key("/out/a", execution="0002-bbbb"), [b"3" * 30])
    backend.put(key("upload.tar.gz", execution="input", kind="input"), [b"4" * 40])
    gone = backend.get("t1", "0001-aaaa", "output", "/out/a")
    assert gone is not None
    assert backend.delete("t1", "0001-aaaa", "output", "/out/a") == 10
    with pytest.raises(FileNotFoundError):
        backend.open(gone)
    assert backend.delete("t1", "0002-bbbb") == 30
    assert backend.delete("t1", kind="input") == 40
    assert [a.path for a in backend.find("t1")] == ["/out/b"]
    assert backend.delete("t1") == 20
    assert backend.find("t1") == [] and backend.usage("ana") == 0
    assert backend.delete("nosuch") == 0


def test_usage_counts_each_users_own_files(backend: ArtifactStore) -> None:
    backend.put(key("/a", task="t1"), [b"x" * 100])
    backend.put(key("/b", task="t2"), [b"x" * 50])
    backend.put(key("/a", task="t3", user="bo"), [b"x" * 7])
    assert (backend.usage("ana"), backend.usage("bo"), backend.usage("cy")) == (150, 7, 0)


def test_retention_finds_tasks_with_files_stored_before_a_time(backend: ArtifactStore) -> None:
    backend.put(key(task="t1"), [b"x"])
    backend.put(key(task="t2"), [b"y"])
    assert backend.stored_before(utcnow() - timedelta(hours=1)) == []
    assert sorted(backend.stored_before(utcnow() + timedelta(seconds=5))) == ["t1", "t2"]
    assert len(backend.stored_before(utcnow() + timedelta(seconds=5), limit=1)) == 1


def test_any_path_a_container_can_name_is_kept_as_text(backend: ArtifactStore) -> None:
    odd = "/out/ünïcödé name with spaces/../..;$(rm -rf)/x"
    backend.put(key(odd), [b"ok"])
    assert [a.path for a in backend.find("t1")] == [odd]
    assert read_all(backend, "t1", odd) == b"ok"


def test_the_directory_backend_never_writes_outside_its_root(tmp_path: Path) -> None:
    store = DirectoryArtifacts(tmp_path / "root")
    store.put(key("/../../../../etc/passwd"), [b"x"])
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to(tmp_path / "root") for p in written)
    with pytest.raises(ValueError):
        store.put(key(user="../evil"), [b"x"])


def test_the_settings_choose_the_backend(tmp_path: Path) -> None:
    beside = open_artifacts(Settings(store_url=f"sqlite:///{tmp_path}/cluster.db"))
    assert isinstance(beside, DirectoryArtifacts) and beside.root == tmp_path / "artifacts"
    chosen = open_artifacts(Settings(store_url=f"sqlite:///{tmp_path}/x.db", artifact_dir=str(tmp_path / "files")))
    assert isinstance(chosen, DirectoryArtifacts) and chosen.root == tmp_path / "files"
