"""Fixtures shared by all test layers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.services import PersistentRedis, RedisServer, docker_client


@pytest.fixture(scope="session", autouse=True)
def _cmdserver_dir() -> Iterator[str]:
    """The command servers that the tests' ``cloudai`` launchers start live here, apart from a developer's own,
    and are stopped when the session ends."""
    import shutil
    import signal
    import tempfile

    folder = tempfile.mkdtemp(prefix="cs-", dir="/tmp")  # short: a socket's path must fit in 108 bytes
    saved = os.environ.get("CLOUDAI_CMDSERVER_DIR")
    os.environ["CLOUDAI_CMDSERVER_DIR"] = folder
    yield folder
    from tests.helpers import cmdservers_in

    for pid in cmdservers_in(folder):
        os.kill(pid, signal.SIGTERM)
    shutil.rmtree(folder, ignore_errors=True)
    if saved is None:
        os.environ.pop("CLOUDAI_CMDSERVER_DIR", None)
    else:
        os.environ["CLOUDAI_CMDSERVER_DIR"] = saved


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    import redis

    redis.Redis.from_url(redis_server.url).flushdb()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str):  # type: ignore[no-untyped-def]
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[PersistentRedis]:
    """A private redis-server a test may stop and start again (append-only: a restart keeps the data)."""
    server = PersistentRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def docker_session():  # type: ignore[no-untyped-def]
    return docker_client()


@pytest.fixture
def store_path(tmp_path: Path) -> str:
    return str(tmp_path / "store.db")


@pytest.fixture
def store(store_path: str) -> Iterator[SQLiteStore]:
    s = SQLiteStore(store_path)
    yield s
    s.close()


@pytest.fixture
def worker_id() -> str:
    return "w-" + uuid.uuid4().hex[:8]


@pytest.fixture
def settings(redis_url: str, store_path: str, worker_id: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        store_url=f"sqlite:///{store_path}",
        worker_id=worker_id,
        user="tester",
        heartbeat_interval_s=0.5,
        heartbeat_timeout_s=4.0,
        beat_interval_s=1.0,
        stop_grace_s=2.0,
    )


@pytest.fixture(autouse=True)
def _no_user_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # tests set what they need; a developer's CLOUDAI_* must not leak in
    for key in list(os.environ):
        if key.startswith("CLOUDAI_") and key not in ("CLOUDAI_REDIS_URL", "CLOUDAI_TEST_IMAGE",
                                                      "CLOUDAI_TEST_MONGO_URL", "CLOUDAI_REQUIRE_SERVICES",
                                                      "CLOUDAI_SERVICE_WAIT", "CLOUDAI_CMDSERVER_DIR"):
            monkeypatch.delenv(key)


@pytest.fixture
def docker_ready(docker_session, worker_id: str):  # type: ignore[no-untyped-def]
    """Docker is there; containers this test's worker left are removed afterwards."""
    yield docker_session
    from tests.helpers import remove_containers

    remove_containers(worker_id)


@pytest.fixture
def workers(settings: Settings, store: SQLiteStore, tmp_path: Path, docker_ready):  # type: ignore[no-untyped-def]
    """Start real `cloudai worker start` subprocesses: ``workers(worker_id, *flags, env={...})``; all stopped
    after."""
    from tests.helpers import WorkerProc, remove_containers

    started: list[WorkerProc] = []

    def start(worker_id: str | None = None, *flags: str, wait: bool = True,
              env: dict[str, str] | None = None) -> WorkerProc:
        proc = WorkerProc(settings, store, worker_id or settings.worker_id, tmp_path, *flags, env=env).start(wait)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
    for wid in {p.worker_id for p in started}:
        remove_containers(wid)


@pytest.fixture
def api_server(settings: Settings, store: SQLiteStore, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real `cloudai server` process on this test's Redis and store (stopped after)."""
    from tests.helpers import ServerProc

    server = ServerProc(settings, store, tmp_path).start()
    yield server
    server.stop()
