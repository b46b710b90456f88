"""What CloudAI relies on in docker-py beyond its documented API (cloudai/docker_adapter.py), and that the
documented streams it uses do not time a quiet task out, on the real engine."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import docker
import pytest

from cloudai.docker_adapter import AttachStream
from cloudai.runtime import ContainerSpec, DockerRuntime
from tests.services import TEST_IMAGE


@pytest.fixture
def runtime(docker_ready) -> Iterator[DockerRuntime]:  # type: ignore[no-untyped-def]
    """Whose client times a request out after 1 s: shorter than the tests' quiet containers."""
    client = docker.DockerClient.from_env(timeout=1)
    yield DockerRuntime(client)
    client.close()


def _container(runtime: DockerRuntime, worker_id: str, command: str) -> str:
    return runtime.create(ContainerSpec(image=TEST_IMAGE, command=["sh", "-c", command], cpus=0.5, memory=64 << 20,
                                        task_id="adapter", worker_id=worker_id))


def _socket_inode(fd: int) -> int | None:
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return None


def test_closing_an_attach_stream_frees_its_descriptor_at_once(runtime: DockerRuntime, worker_id: str) -> None:
    """docker-py keeps the response on the socket (``_response``); closing it closes the connection now, not
    at the next full garbage collection (none runs here)."""
    container_id = _container(runtime, worker_id, "true")
    gc.disable()
    try:
        stream = AttachStream(runtime.api, container_id)
        fd = stream.sock.fileno()
        inode = _socket_inode(fd)
        assert inode is not None and hasattr(stream.sock, "_response")
        stream.close()
        assert _socket_inode(fd) != inode  # closed (or the number reused by something else: not our socket)
    finally:
        gc.enable()


def test_a_quiet_container_times_neither_stream_out(runtime: DockerRuntime, worker_id: str) -> None:
    """Silent for 2 s with a 1 s client timeout: the attach stream (opened before the start) and a following
    log stream both wait for the output, whole and in order."""
    container_id = _container(runtime, worker_id, "sleep 2; echo late; echo later >&2")
    attached = runtime.attach_frames(container_id)
    runtime.start(container_id)
    logged = [frame.split(b" ", 1)[1] for frame in runtime.stream_frames(container_id, follow=True)]
    assert sorted(logged) == [b"late\n", b"later\n"]  # stdout and stderr: copied apart, so in either order
    frames = [frame.split(b" ", 1)[1] for frame in attached if frame is not None]
    assert sorted(frames) == [b"late\n", b"later\n"]


def test_the_log_stream_of_an_ended_container_is_read_whole(runtime: DockerRuntime, worker_id: str) -> None:
    container_id = _container(runtime, worker_id, "seq 1 5000")
    runtime.start(container_id)
    assert runtime.wait(container_id) == 0
    frames = list(runtime.stream_frames(container_id, follow=False))
    assert [frame.split(b" ", 1)[1] for frame in frames] == [f"{n}\n".encode() for n in range(1, 5001)]
