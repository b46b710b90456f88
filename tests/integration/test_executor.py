"""The executor on real Docker and Redis with the SQLite store (no Celery: messages are handed over directly)."""

from __future__ import annotations

import threading

import docker
import pytest

from cloudai import keys
from cloudai.api import CloudAI
from cloudai.executor import Executor
from cloudai.logs import LogBus, LogEnd, LogLine
from cloudai.models import MiB, TaskStatus
from cloudai.runtime import DockerRuntime
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import (
    executor,
    message,
    queued_task,
    register,
    run_in_thread,
    task_pids_limit,
    wait_for,
    wait_started,
)
from tests.services import TEST_IMAGE

S = TaskStatus
pytestmark = pytest.mark.usefixtures("docker_ready")

CGROUP_LIMITS = (
    "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes; "
    "cat /sys/fs/cgroup/cpu.max 2>/dev/null || "
    "echo $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us); "
    "cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max"
)


@pytest.fixture(autouse=True)
def _registered(settings: Settings, store: SQLiteStore) -> None:
    register(store, settings.worker_id, gpu_ids=["0"])


def _lines(api: CloudAI, task_id: str) -> tuple[list[str], LogEnd]:
    events = list(api.follow(task_id))
    assert isinstance(events[-1], LogEnd)
    return [e.text for e in events if isinstance(e, LogLine)], events[-1]


def test_container_sees_its_own_limits(settings: Settings, store: SQLiteStore) -> None:
    """Smoke test of the real services: a 64 MiB, 1.5 CPU container reads back its cgroup limits."""
    task = queued_task(store, settings.worker_id, CGROUP_LIMITS, memory_bytes=64 * MiB, req_cpu=1.5)
    assert executor(settings, store).run(message(task)) == "completed"
    lines, end = _lines(CloudAI(settings), task.task_id)
    assert lines[0] == str(64 * MiB)
    quota, period = lines[1].split()
    assert int(quota) / int(period) == 1.5
    assert lines[2] == str(task_pids_limit(settings))
    assert end.status == "completed" and end.exit_code == 0


def test_limits_as_docker_applied_them_and_cancel_stops_the_container(
    settings: Settings, store: SQLiteStore
) -> None:
    task = queued_task(store, settings.worker_id, "trap 'exit 0' TERM; while true; do sleep 0.1; done",
                       memory_bytes=256 * MiB, req_cpu=0.5, labels={"team": "ml"})
    thread, result = run_in_thread(executor(settings, store).run, message(task))
    running = wait_started(store, task.task_id)
    info = docker.from_env().api.inspect_container(running.container_id)
    host = info["HostConfig"]
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == 256 * MiB and host["MemorySwap"] == 256 * MiB
    assert host["PidsLimit"] == task_pids_limit(settings)
    assert host["SecurityOpt"] == ["no-new-privileges"] and not host["Privileged"]
    assert not host.get("AutoRemove")
    assert info["Config"]["Labels"] == {"team": "ml", keys.LABEL_TASK_ID: task.task_id,
                                        keys.LABEL_WORKER_ID: settings.worker_id,
                                        keys.LABEL_EXECUTION_ID: task.execution_id}
    # docker run's rule: the arguments replace the image's CMD, its ENTRYPOINT (none here) stays
    assert info["Config"]["Entrypoint"] is None and info["Config"]["Cmd"] == task.args
    cancelled = CloudAI(settings).cancel(task.task_id, by="ana")
    thread.join(30)
    assert result == ["cancelled"]
    assert cancelled.status == S.CANCELLED and cancelled.error.message == "cancelled by ana"  # type: ignore[union-attr]
    assert DockerRuntime().inspect(running.container_id) is None  # stopped and removed


def test_sigterm_ignoring_container_is_killed_after_grace(settings: Settings, store: SQLiteStore) -> None:
    """The order of events, not their timing: SIGTERM first (the container says it got it and carries on), then,
    the grace period over, SIGKILL (exit code 137)."""
    task = queued_task(store, settings.worker_id,
                       "trap 'echo got TERM' TERM; echo ready; while true; do sleep 0.1; done")
    thread, result = run_in_thread(executor(settings, store).run, message(task))
    bus = LogBus.from_url(settings.redis_url)
    wait_for(lambda: "ready" in [ln.text for ln in bus.history(task.task_id)], what="the trap to be set")
    CloudAI(settings).cancel(task.task_id, wait_s=0)
    thread.join(30)
    assert result == ["cancelled"]
    lines, end = _lines(CloudAI(settings), task.task_id)
    assert lines[:2] == ["ready", "got TERM"], lines  # it was asked to stop, and did not
    assert end.status == "cancelled" and end.exit_code == 137, end  # so it was killed
    assert store.get_task(task.task_id).exit_code == 137  # type: ignore[union-attr]


def test_out_of_memory_is_reported_with_the_limit(settings: Settings, store: SQLiteStore) -> None:
    task = queued_task(store, settings.worker_id,
                       "echo start; x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo never", memory_bytes=32 * MiB)
    assert executor(settings, store).run(message(task)) == "failed"
    got = store.get_task(task.task_id)
    assert got is not None
    assert (got.status, got.exit_code, got.oom_killed) == (S.FAILED, 137, True)
    assert got.error is not None and got.error.message == "killed: out of memory, limit 32 MiB"
    lines, end = _lines(CloudAI(settings), task.task_id)
    # the shell may report its killed pipeline ("Killed") before the kernel kills it too: that is output
    assert lines[0] == "start" and set(lines[1:]) <= {"Killed"}, lines
    assert (end.status, end.exit_code, end.reason) == ("failed", 137, "killed: out of memory, limit 32 MiB")


def test_non_zero_exit_fails_with_that_code_and_log_is_archived(settings: Settings, store: SQLiteStore) -> None:
    task = queued_task(store, settings.worker_id, "echo a; echo b >&2; exit 3")
    assert executor(settings, store).run(message(task)) == "failed"
    got = store.get_task(task.task_id)
    assert got is not None and (got.status, got.exit_code, got.oom_killed) == (S.FAILED, 3, False)
    assert got.error is not None and got.error.message == "exited with code 3"
    # Docker reads stdout and stderr through separate pipes: their relative order is Docker's
    assert sorted(ln.split(" ", 1)[1] for ln in store.read_log(task.task_id) or []) == ["a", "b"]
    assert DockerRuntime().find(task_id=task.task_id) == []  # removed after archiving


class _RecordingApi(docker.APIClient):
    """Docker's real API client, recording the calls a task makes."""

    calls: list[str]

    def _record(self, name: str, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.calls.append(name)
        return fn(*args, **kwargs)

    def inspect_image(self, *a, **k):  # type: ignore[no-untyped-def]
        return self._record("inspect_image", super().inspect_image, *a, **k)

    def wait(self, *a, **k):  # type: ignore[no-untyped-def]
        return self._record("wait", super().wait, *a, **k)

    def inspect_container(self, *a, **k):  # type: ignore[no-untyped-def]
        return self._record("inspect_container", super().inspect_container, *a, **k)


def test_exit_and_log_end_are_reported_and_resources_handed_on_before_the_removal(
    settings: Settings, store: SQLiteStore
) -> None:
    """As ``docker run``'s exit code: the user waits for the exit, not for the removal. When Docker removes the
    container, the outcome is recorded, the log is closed with it and what the attempt held is handed on (the
    next placement has run); the container is removed in the end. An image that is here is not inspected
    first, and the exit (code and OOM flag) comes from the one inspect that saw the container stop."""
    seen: list[tuple[str, object]] = []

    class Recording(DockerRuntime):
        def remove(self, container_id: str) -> None:
            task_now = store.get_task(task.task_id)
            _, last = CloudAI(settings).bus.last_entry(task.task_id)
            seen.append(("remove", (task_now.status if task_now else None, last,
                                    DockerRuntime().inspect(container_id) is not None)))
            super().remove(container_id)

    api = _RecordingApi(version="auto", **docker.utils.kwargs_from_env())
    api.calls = []
    client = docker.DockerClient.__new__(docker.DockerClient)
    client.api = api
    task = queued_task(store, settings.worker_id, "echo out; exit 4")
    bus = LogBus.from_url(settings.redis_url)
    ex = Executor(settings, store, bus, Recording(client), bus.redis,
                  after_finish=lambda t: seen.append(("placed", t.task_id)))
    assert ex.run(message(task)) == "failed"
    assert [what for what, _ in seen] == ["placed", "remove"]
    status, last, present = seen[1][1]  # type: ignore[misc]
    assert status == S.FAILED and present
    assert isinstance(last, LogEnd) and (last.status, last.exit_code) == ("failed", 4)
    assert DockerRuntime().find(task_id=task.task_id) == []  # removed in the end
    got = store.get_task(task.task_id)
    assert got is not None and (got.exit_code, got.oom_killed, got.error.message) == (  # type: ignore[union-attr]
        4, False, "exited with code 4")
    assert "inspect_image" not in api.calls and "wait" not in api.calls
    assert api.calls.count("inspect_container") == 1, api.calls


class _CountingLogs(DockerRuntime):
    """The real engine, counting reads of Docker's log API."""

    def __init__(self) -> None:
        super().__init__()
        self.log_reads = 0

    def stream_frames(self, container_id: str, follow: bool = True):  # type: ignore[no-untyped-def]
        self.log_reads += 1
        return super().stream_frames(container_id, follow)


def test_output_is_read_once_from_the_attach_stream_complete_and_in_order(
    settings: Settings, store: SQLiteStore
) -> None:
    """The container's output comes through the attach stream opened before its start: every line, in order,
    published and archived, and Docker's log is not read a second time (it once was, in full, after exit)."""
    runtime = _CountingLogs()
    task = queued_task(store, settings.worker_id, "seq 1 20000; echo last-without-newline | tr -d '\\n'")
    assert executor(settings, store, runtime).run(message(task)) == "completed"
    lines, end = _lines(CloudAI(settings), task.task_id)
    assert lines == [str(n) for n in range(1, 20001)] + ["last-without-newline"] and end.status == "completed"
    archived = store.read_log(task.task_id) or []
    assert [ln.split(" ", 1)[1] for ln in archived] == lines
    assert runtime.log_reads == 0


def test_timeout_stops_the_container(settings: Settings, store: SQLiteStore) -> None:
    task = queued_task(store, settings.worker_id, "echo tick; sleep 60", timeout_s=1.0)
    assert executor(settings, store).run(message(task)) == "timeout"  # not "completed" after its sleep 60
    got = store.get_task(task.task_id)
    assert got is not None and got.status == S.TIMEOUT
    assert got.error is not None and "timed out after 1s" in got.error.message
    assert DockerRuntime().find(task_id=task.task_id) == []


def test_duplicate_delivery_starts_one_container(settings: Settings, store: SQLiteStore) -> None:
    creates: list[str] = []

    class Counting(DockerRuntime):
        def create(self, spec):  # type: ignore[no-untyped-def]
            creates.append(spec.task_id)
            return super().create(spec)

    runtime = Counting()
    task = queued_task(store, settings.worker_id, "sleep 1; echo done")
    # two worker processes got the same message (redelivery): two executors, one store
    first, second = executor(settings, store, runtime), executor(settings, store, runtime)
    barrier = threading.Barrier(2)
    results: list[str] = []

    def deliver(ex):  # type: ignore[no-untyped-def]
        barrier.wait()
        results.append(ex.run(message(task)))

    threads = [threading.Thread(target=deliver, args=(ex,)) for ex in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == ["completed", "skipped"]
    assert creates == [task.task_id]
    # and a late third delivery of a finished task does nothing
    assert executor(settings, store, runtime).run(message(task)) == "skipped"
    assert creates == [task.task_id]


def test_missing_image_with_pull_never_fails_clearly(settings: Settings, store: SQLiteStore) -> None:
    task = queued_task(store, settings.worker_id, "true", image="cloudai/not-here:1", pull_policy="never")
    assert executor(settings, store).run(message(task)) == "failed"
    got = store.get_task(task.task_id)
    assert got is not None and got.error is not None and got.exit_code is None
    assert got.error.type == "ImageError"
    assert "cloudai/not-here:1" in got.error.message and "'never'" in got.error.message
    _, end = _lines(CloudAI(settings), task.task_id)
    assert end.status == "failed" and "cloudai/not-here:1" in (end.reason or "")


def test_unreachable_registry_fails_clearly(settings: Settings, store: SQLiteStore) -> None:
    task = queued_task(store, settings.worker_id, "true", image="127.0.0.1:9/nothing/here:1")
    allowed = settings.replace(allowed_registries=("docker.io", "127.0.0.1:9"))  # a loopback registry, named
    assert executor(allowed, store).run(message(task)) == "failed"
    got = store.get_task(task.task_id)
    assert got is not None and got.error is not None and got.error.type == "ImageError"
    assert got.error.message == "image '127.0.0.1:9/nothing/here:1' could not be pulled: registry unreachable (its " \
                                "name does not resolve, or it does not answer)"


def test_gpu_task_asks_docker_for_exact_device_ids(settings: Settings, store: SQLiteStore) -> None:
    """No GPU here: capture the real create call; Docker then refuses (no NVIDIA runtime) and the task fails
    with Docker's reason."""
    captured: list[dict] = []  # type: ignore[type-arg]

    class Recording(docker.APIClient):
        def create_container_from_config(self, config, name=None, platform=None):  # type: ignore[no-untyped-def]
            captured.append(config)
            return super().create_container_from_config(config, name, platform)

    client = docker.DockerClient.__new__(docker.DockerClient)
    client.api = Recording(version="auto", **docker.utils.kwargs_from_env())
    task = queued_task(store, settings.worker_id, "nvidia-smi", req_gpu=2, gpu_ids=["1", "3"])
    status = executor(settings, store, DockerRuntime(client)).run(message(task))
    requests = captured[0]["HostConfig"]["DeviceRequests"]
    assert requests == [{"Driver": "", "Count": 0, "DeviceIDs": ["1", "3"], "Capabilities": [["gpu"]],
                         "Options": {}}]
    got = store.get_task(task.task_id)
    assert got is not None
    if status == "failed":  # the usual case without a GPU runtime
        assert got.error is not None and got.error.type == "RuntimeFailure"
        assert "could not" in got.error.message


def test_gpu_held_by_a_live_task_is_never_shared(settings: Settings, store: SQLiteStore) -> None:
    """The worker-side guard on real Redis. The containers run on the fake engine: without an NVIDIA runtime a
    real GPU container fails at once, and the holder must keep running while the intruder arrives."""
    from cloudai.stub_runtime import StubRuntime

    engine = StubRuntime(["holding"], forever=True)
    holder = queued_task(store, settings.worker_id, "sleep 30", req_gpu=1, gpu_ids=["0"])
    thread, _ = run_in_thread(executor(settings, store, engine).run, message(holder))
    wait_for(lambda: store.get_task(holder.task_id).status == S.RUNNING, what="holder running")  # type: ignore[union-attr]
    intruder = queued_task(store, settings.worker_id, "true", req_gpu=1, gpu_ids=["0"])
    assert executor(settings, store, engine).run(message(intruder)) == "failed"
    got = store.get_task(intruder.task_id)
    assert got is not None and got.error is not None and got.error.type == "GpuBusy"
    assert f"in use by task {holder.task_id}" in got.error.message
    CloudAI(settings).cancel(holder.task_id)
    thread.join(30)
    assert store.get_task(holder.task_id).status == S.CANCELLED  # type: ignore[union-attr]
    # released at the end: the next task gets the GPU
    after = queued_task(store, settings.worker_id, "true", req_gpu=1, gpu_ids=["0"])
    assert executor(settings, store, StubRuntime(["ok"])).run(message(after)) == "completed"


def test_cancel_of_queued_task_makes_its_message_a_no_op(settings: Settings, store: SQLiteStore) -> None:
    task = queued_task(store, settings.worker_id, "echo should-not-run")
    api = CloudAI(settings, dispatch=lambda t: None)
    assert api.cancel(task.task_id).status == S.CANCELLED
    assert executor(settings, store).run(message(task)) == "skipped"
    assert DockerRuntime().find(task_id=task.task_id) == []
    _, end = _lines(api, task.task_id)
    assert end.status == "cancelled"


def test_pull_always_fails_rather_than_run_a_stale_local_image(settings: Settings, store: SQLiteStore) -> None:
    # the test image is local only: 'always' must pull, and the registry (docker.io) is not reachable here
    task = queued_task(store, settings.worker_id, "true", pull_policy="always",
                       image="127.0.0.1:9/cloudai/busybox:local")
    docker.from_env().api.tag(TEST_IMAGE, "127.0.0.1:9/cloudai/busybox", "local")
    allowed = settings.replace(allowed_registries=("docker.io", "127.0.0.1:9"))  # a loopback registry, named
    try:
        assert executor(allowed, store).run(message(task)) == "failed"
    finally:
        docker.from_env().api.remove_image("127.0.0.1:9/cloudai/busybox:local")
    got = store.get_task(task.task_id)
    assert got is not None and got.error is not None and "could not be pulled" in got.error.message


class _BrokenLogs(DockerRuntime):
    """The real engine, with the live output streams failing every time (an injected reader-thread failure)."""

    def attach_frames(self, container_id: str):  # type: ignore[no-untyped-def]
        raise ConnectionError("injected: attach failure")

    def stream_frames(self, container_id: str, follow: bool = True):  # type: ignore[no-untyped-def]
        if follow:
            raise ConnectionError("injected: log stream failure")
        return super().stream_frames(container_id, follow)


def test_reader_failure_cancel_and_timeout_still_stop_the_real_container(
    settings: Settings, store: SQLiteStore, redis_client
) -> None:  # type: ignore[no-untyped-def]
    cancelled = queued_task(store, settings.worker_id, "echo up; sleep 60")
    thread, result = run_in_thread(executor(settings, store, _BrokenLogs()).run, message(cancelled))
    running = wait_started(store, cancelled.task_id)
    redis_client.set(keys.cancel_flag(cancelled.task_id), "ana")
    timed = queued_task(store, settings.worker_id, "sleep 60", timeout_s=1.0)
    assert executor(settings, store, _BrokenLogs()).run(message(timed)) == "timeout"
    thread.join(30)
    assert result == ["cancelled"]
    assert DockerRuntime().inspect(running.container_id or "") is None  # stopped, recorded, removed
    lines, end = _lines(CloudAI(settings), cancelled.task_id)
    assert lines == ["up"] and end.status == "cancelled"  # the archive/catch-up read Docker's own log
