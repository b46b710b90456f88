"""Container hardening read back from real containers (issue 15): capabilities (docker inspect and CapEff inside),
no-new-privileges, pids limit, read-only root with a writable /tmp, NVIDIA_VISIBLE_DEVICES forced, and the
worker's own image allow-list."""

from __future__ import annotations

import docker
import pytest

from cloudai.api import CloudAI
from cloudai.cli.render import exit_code_for
from cloudai.limits import CAPABILITIES, DEFAULT_CAPS
from cloudai.logs import LogEnd, LogLine
from cloudai.models import MiB, TaskStatus
from cloudai.runtime import DockerRuntime
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import executor, message, queued_task, register, run_in_thread, task_pids_limit, wait_started

S = TaskStatus
pytestmark = pytest.mark.usefixtures("docker_ready")
PROBE = ("grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; echo NV=$NVIDIA_VISIBLE_DEVICES; echo A=$A; "
         "touch /probe 2>/dev/null && echo root=rw || echo root=ro; touch /tmp/probe && echo tmp=rw; ")
WAIT = "trap 'exit 0' TERM; while true; do sleep 0.1; done"


def _mask(caps: list[str] | tuple[str, ...]) -> str:
    return f"{sum(1 << CAPABILITIES.index(c) for c in caps):016x}"


def _run_and_inspect(settings: Settings, store: SQLiteStore, **fields: object) -> tuple[dict, list[str]]:  # type: ignore[type-arg]
    task = queued_task(store, settings.worker_id, PROBE + WAIT, memory_bytes=64 * MiB, **fields)
    thread, result = run_in_thread(executor(settings, store).run, message(task))
    running = wait_started(store, task.task_id)
    info = docker.from_env().api.inspect_container(running.container_id)
    CloudAI(settings).cancel(task.task_id, by="test")
    thread.join(30)
    assert result == ["cancelled"]
    lines = [e.text for e in CloudAI(settings).logs(task.task_id) if isinstance(e, LogLine)]
    return info, lines


def test_default_hardening_read_back_from_the_container(settings: Settings, store: SQLiteStore) -> None:
    register(store, settings.worker_id)
    info, lines = _run_and_inspect(settings, store, env={"A": "2"}, read_only=True)
    host = info["HostConfig"]
    assert host["CapDrop"] == ["ALL"] and set(host["CapAdd"]) == set(DEFAULT_CAPS)
    assert "NET_RAW" not in host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges"] and not host["Privileged"]
    assert host["PidsLimit"] == task_pids_limit(settings)  # its share of the host (cloudai.pidbudget)
    assert host["ReadonlyRootfs"] is True and host["Tmpfs"] == {"/tmp": f"rw,nosuid,nodev,size={64 * 1024**2}"}
    assert "NVIDIA_VISIBLE_DEVICES=void" in info["Config"]["Env"]
    # Docker's own log of the container is rotated (the worker reads the attach stream; that log is the fallback)
    assert host["LogConfig"] == {"Type": "json-file", "Config": {"max-size": str(10 * 1024**2), "max-file": "3"}}
    # NoNewPrivs 1: no-new-privileges; Seccomp 2: Docker's default seccomp filter is on
    assert lines[:7] == [f"CapEff:\t{_mask(DEFAULT_CAPS)}", "NoNewPrivs:\t1", "Seccomp:\t2", "NV=void", "A=2",
                         "root=ro", "tmp=rw"]


def test_operator_capability_settings(settings: Settings, store: SQLiteStore) -> None:
    register(store, settings.worker_id)
    custom = settings.replace(cap_drop=("ALL",), cap_add=("NET_RAW", "KILL"))
    info, lines = _run_and_inspect(custom, store)
    assert info["HostConfig"]["CapAdd"] == ["KILL", "NET_RAW"] and info["HostConfig"]["CapDrop"] == ["ALL"]
    assert not info["HostConfig"].get("ReadonlyRootfs")
    assert lines[0] == f"CapEff:\t{_mask(['KILL', 'NET_RAW'])}"
    assert lines[5] == "root=rw"


def test_the_worker_enforces_its_own_image_allow_list(settings: Settings, store: SQLiteStore) -> None:
    """The submitting side allowed the image (no list there); the worker's own list refuses it."""
    register(store, settings.worker_id)
    strict = settings.replace(allowed_images=("ghcr.io/org/*", "registry.local/*"))
    task = queued_task(store, settings.worker_id, "echo should not run")
    assert executor(strict, store).run(message(task)) == "failed"
    got = store.get_task(task.task_id)
    assert got is not None and got.status == S.FAILED and got.error is not None
    assert got.error.type == "ImageNotAllowed"
    assert got.error.message == (f"image {task.docker_image!r} is not allowed on worker {settings.worker_id}; "
                                 "allowed images (CLOUDAI_ALLOWED_IMAGES): ghcr.io/org/*, registry.local/*")
    assert got.container_id is None and DockerRuntime().find(task_id=task.task_id) == []
    end = list(CloudAI(settings).logs(task.task_id))[-1]
    assert isinstance(end, LogEnd) and end.reason == got.error.message
    assert exit_code_for(end.status, end.exit_code) == 125  # failed before its container ran
