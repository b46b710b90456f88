"""Workloads on real Docker and Redis with the SQLite store (issue 24): containers run as `docker run` runs them
(compared with a real `docker run --rm`), container options read back from inside, volumes bound only as their
operator declared them, and placement by volumes and GPU ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudai.api import CloudAI
from cloudai.errors import PlacementError
from cloudai.logs import LogEnd, LogLine
from cloudai.models import GiB, MiB, Resources, Task, TaskStatus, WorkerState
from cloudai.runoptions import shell_args
from cloudai.runtime import DockerRuntime
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from cloudai.submission import SubmitRequest, build_request
from tests.helpers import docker_run, entrypoint_image, executor, message, queued_task, register
from tests.services import TEST_IMAGE

S = TaskStatus
pytestmark = pytest.mark.usefixtures("docker_ready")


def _run(settings: Settings, store: SQLiteStore, image: str = TEST_IMAGE, **fields: object
         ) -> tuple[list[str], LogEnd, Task]:
    """Run one task on the executor; its log lines, end marker and record."""
    task = queued_task(store, settings.worker_id, None, image, memory_bytes=512 * MiB, **fields)
    executor(settings, store).run(message(task))
    events = list(CloudAI(settings).follow(task.task_id))
    assert isinstance(events[-1], LogEnd)
    got = store.get_task(task.task_id)
    assert got is not None
    return [e.text for e in events if isinstance(e, LogLine)], events[-1], got


@pytest.fixture
def image() -> str:
    return entrypoint_image()


# (arguments after the image, --entrypoint): each as `docker run --rm [--entrypoint E] IMAGE ARGS...` runs it
CASES = [
    ([], None),  # the image's CMD, through its ENTRYPOINT
    (["echo", "hi"], None),  # the arguments replace CMD; the ENTRYPOINT runs first
    (["sh", "-c", "echo a; exit 3"], None),  # a shell only where one is asked for
    (shell_args("echo $0 and $HOME; exit 4"), None),  # what --shell records
    (["a", "b c"], "/bin/echo"),  # --entrypoint replaces it; arguments stay words
    (["echo", "cleared"], ""),  # --entrypoint '' clears it
]


@pytest.mark.parametrize("args, entrypoint", CASES)
def test_an_image_with_an_entrypoint_runs_exactly_as_docker_run(settings: Settings, store: SQLiteStore, image: str,
                                                                   args: list[str], entrypoint: str | None) -> None:
    register(store, settings.worker_id)
    expected, code = docker_run(*([] if entrypoint is None else ["--entrypoint", entrypoint]), image, *args)
    lines, end, task = _run(settings, store, image=image, args=args, entrypoint=entrypoint)
    assert lines == expected
    assert end.exit_code == code and task.exit_code == code
    if entrypoint is None:
        assert lines[0] == "entrypoint-ran"


def test_a_command_line_as_one_argument_fails_with_a_hint(settings: Settings, store: SQLiteStore) -> None:
    """docker run's rule: `IMAGE 'echo a; exit 3'` names a program; the reason says what to do instead."""
    register(store, settings.worker_id)
    _, end, task = _run(settings, store, args=["echo a; exit 3"])
    assert task.status == S.FAILED and task.error is not None and task.error.type == "RuntimeFailure"
    assert "executable file not found" in task.error.message and "--shell" in task.error.message


def test_shm_size_user_ipc_and_ulimits_as_the_container_sees_them(settings: Settings, store: SQLiteStore,
                                                                   image: str) -> None:
    register(store, settings.worker_id)
    probe = "df -k /dev/shm | tail -1; id; ulimit -n; ulimit -Hn; ls -d /dev/shm"
    lines, end, task = _run(settings, store, image=image, entrypoint="", args=["sh", "-c", probe],
                            shm_size=256 * MiB, container_user="1000:1000", ipc="private",
                            ulimits=["nofile=100:200"])
    assert end.status == "completed", lines
    assert lines[0].split()[1] == str(256 * 1024)  # 1K-blocks: 256 MiB
    assert lines[1].startswith("uid=1000 gid=1000")
    assert lines[2:5] == ["100", "200", "/dev/shm"]
    expected, _ = docker_run("--entrypoint", "", "--shm-size", "256m", "-u", "1000:1000", "--ipc", "private",
                             "--ulimit", "nofile=100:200", image, "sh", "-c", probe)
    assert lines == expected
    # ipc none: no /dev/shm at all, as docker run gives it
    lines, end, _ = _run(settings, store, args=["sh", "-c", "ls /dev/shm 2>/dev/null || echo none"], ipc="none")
    assert lines == ["none"]


@pytest.fixture
def volumes(tmp_path: Path) -> dict[str, Path]:
    """A read-only dataset (with a symlink that leads to /etc), a per-user writable outputs directory, a shared
    writable scratch directory."""
    data = tmp_path / "datasets"
    (data / "mnist").mkdir(parents=True)
    (data / "mnist" / "train.txt").write_text("60000 images\n")
    (data / "escape").symlink_to("/etc")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    return {"data": data, "outputs": outputs}


def _worker(settings: Settings, store: SQLiteStore, volumes: dict[str, Path]) -> Settings:
    spec = f"data={volumes['data']}:ro,outputs={volumes['outputs']}/{{user}}:rw"
    register(store, settings.worker_id)
    return settings.replace(worker_volumes=spec)


def test_a_read_only_volume_is_read_and_not_written_and_outputs_are_per_user(
        settings: Settings, store: SQLiteStore, volumes: dict[str, Path], image: str) -> None:
    settings = _worker(settings, store, volumes)
    script = ("cat /data/train.txt; (echo x > /data/train.txt) 2>/dev/null || echo write-refused; "
              "echo weights > /out/model.ckpt; id -u")
    lines, end, task = _run(settings, store, image, user_id="ana", entrypoint="", args=shell_args(script),
                            container_user="1000:1000", mounts=["data/mnist:/data", "outputs:/out"])
    assert end.status == "completed", (lines, end.reason)
    assert lines == ["60000 images", "write-refused", "1000"]
    ana = volumes["outputs"] / "ana"
    assert (ana / "model.ckpt").read_text() == "weights\n"
    assert (volumes["data"] / "mnist" / "train.txt").read_text() == "60000 images\n"
    assert ana.stat().st_uid == 1000 and ana.stat().st_mode & 0o777 == 0o700  # made for the task's user, private
    # bo's task gets bo's own directory: ana's checkpoint is neither visible nor writable
    lines, end, _ = _run(settings, store, user_id="bo", args=["sh", "-c", "ls -A /out; echo mine > /out/model.ckpt"],
                         mounts=["outputs:/out"])
    assert end.status == "completed" and lines == []
    assert (ana / "model.ckpt").read_text() == "weights\n"
    assert (volumes["outputs"] / "bo" / "model.ckpt").read_text() == "mine\n"


@pytest.mark.parametrize("mount, refused", [
    ("data/escape:/etc2", "leads outside volume data"),  # a symlink in the volume pointing at /etc
    ("outputs/link:/x", "leads outside volume outputs"),  # one a task of the same user left in its directory
    ("data/missing:/x", "does not exist"),
    ("data:/x:rw", "read-only on this worker"),
    ("scratch:/x", "offers no volume 'scratch'"),
])
def test_a_mount_that_would_escape_is_refused_with_a_clear_reason(
        settings: Settings, store: SQLiteStore, volumes: dict[str, Path], mount: str, refused: str) -> None:
    settings = _worker(settings, store, volumes)
    (volumes["outputs"] / "ana").mkdir(mode=0o700)
    (volumes["outputs"] / "ana" / "link").symlink_to("/etc")
    lines, end, task = _run(settings, store, user_id="ana", args=["cat", "/etc2/hostname"], mounts=[mount])
    assert task.status == S.FAILED and task.error is not None and task.error.type == "MountRefused"
    assert refused in task.error.message and lines == []
    assert task.exit_code is None  # no container ran


def test_the_worker_applies_its_own_bounds(settings: Settings, store: SQLiteStore) -> None:
    """A task recorded under another operator's settings: this worker's CLOUDAI_ULIMITS and host IPC rule win."""
    register(store, settings.worker_id)
    _, _, task = _run(settings, store, args=["true"], ulimits=["core=0:0"])
    assert task.status == S.FAILED and task.error is not None and task.error.type == "WorkerRefused"
    assert "--ulimit core is not allowed" in task.error.message
    _, _, task = _run(settings, store, args=["true"], ipc="host")
    assert task.error is not None and "CLOUDAI_ALLOW_HOST_IPC" in task.error.message


# -- placement --------------------------------------------------------------------------------------------
class Sent(list[Task]):
    def __call__(self, task: Task) -> None:
        self.append(task)


def _mounting(*mounts: str, **kw: object) -> SubmitRequest:
    return SubmitRequest(image="busybox", args=["true"], mounts=list(mounts), **kw)  # type: ignore[arg-type]


def test_placement_picks_only_workers_that_offer_the_volumes(settings: Settings, store: SQLiteStore) -> None:
    api = CloudAI(settings, dispatch=Sent())
    for worker_id, volumes in (("a", {"data": "ro"}), ("b", {"data": "rw", "outputs": "rw,per-user"}), ("c", {})):
        info = register(store, worker_id)
        info.volumes = volumes
        store.upsert_worker(info)
    assert {api.submit(_mounting("data:/d")).worker_id for _ in range(4)} == {"a", "b"}
    assert api.submit(_mounting("data:/d:rw")).worker_id == "b"
    assert api.submit(_mounting("outputs/run1:/o", "data/x:/d:ro")).worker_id == "b"
    with pytest.raises(PlacementError, match="no registered worker offers volume nosuch"):
        api.submit(_mounting("nosuch:/x"))
    with pytest.raises(PlacementError, match="worker c does not offer volume data"):
        api.submit(_mounting("data:/d", worker="c"))
    # only an offline worker offers it: the task waits, saying so
    store.set_worker_state("b", WorkerState.OFFLINE)
    waiting = api.submit(_mounting("outputs:/o"))
    assert waiting.status == S.PENDING and "only offline worker b could" in (waiting.pending_reason or "")


def test_gpu_device_ids_pick_the_worker_and_exactly_those_gpus(settings: Settings, store: SQLiteStore) -> None:
    sent = Sent()
    api = CloudAI(settings, dispatch=sent)
    register(store, "g1", gpu_ids=["0", "1"])
    register(store, "g2", gpu_ids=["0", "1", "2", "3"])
    first = api.submit(build_request(image="busybox", args=["nvidia-smi"], gpus="device=3"))
    assert (first.worker_id, first.gpu_ids, first.req_gpu) == ("g2", ["3"], 1)
    both = [api.submit(build_request(image="busybox", gpus="device=1,0")) for _ in range(2)]
    assert sorted(t.worker_id for t in both) == ["g1", "g2"] and all(t.gpu_ids == ["0", "1"] for t in both)
    busy = api.submit(build_request(image="busybox", gpus="device=1"))
    assert busy.status == S.PENDING and busy.pending_reason == "needs GPU 1; it is busy on every worker that has it"
    with pytest.raises(PlacementError, match="no registered worker offers GPU 7"):
        api.submit(build_request(image="busybox", gpus="device=7"))
    assert [m.gpu_ids for m in sent] == [["3"], ["0", "1"], ["0", "1"]]


def test_a_device_task_asks_docker_for_exactly_its_ids(settings: Settings, store: SQLiteStore) -> None:
    """No GPU here: the real create request is captured (Docker then refuses it without an NVIDIA runtime)."""
    import docker

    captured: list[dict] = []  # type: ignore[type-arg]

    class Recording(docker.APIClient):
        def create_container_from_config(self, config, name=None, platform=None):  # type: ignore[no-untyped-def]
            captured.append(config)
            return super().create_container_from_config(config, name, platform)

    register(store, settings.worker_id, gpu_ids=["0", "1", "2"])
    task = CloudAI(settings, dispatch=Sent()).submit(build_request(image=TEST_IMAGE, args=["true"], gpus="device=2"))
    client = docker.DockerClient.__new__(docker.DockerClient)
    client.api = Recording(version="auto", **docker.utils.kwargs_from_env())
    executor(settings, store, DockerRuntime(client)).run(message(task))
    host, env = captured[0]["HostConfig"], captured[0]["Env"]
    assert [r["DeviceIDs"] for r in host["DeviceRequests"]] == [["2"]] and "NVIDIA_VISIBLE_DEVICES=2" in env


def test_a_count_of_gpus_still_takes_any_free_ids(settings: Settings, store: SQLiteStore) -> None:
    api = CloudAI(settings, dispatch=Sent())
    register(store, "g", gpu_ids=["0", "1"])
    held = api.submit(build_request(image="busybox", gpus="device=0"))
    counted = api.submit(SubmitRequest(image="busybox", resources=Resources(gpus=1, memory=GiB)))
    assert held.gpu_ids == ["0"] and counted.gpu_ids == ["1"]


def test_volume_directories_must_exist_when_the_worker_starts(tmp_path: Path) -> None:
    from cloudai.agent import host_capacity
    from cloudai.errors import ConfigError

    capacity = host_capacity("1", "1g", "none", "", volumes=f"data={tmp_path}:ro,out={tmp_path}/{{user}}:rw")
    assert capacity.volumes == {"data": "ro", "out": "rw,per-user"}
    with pytest.raises(ConfigError, match="is not a directory on this host"):
        host_capacity("1", "1g", "none", "", volumes=f"data={tmp_path}/nope")
