"""Real processes: `cloudai worker start` consuming its Redis queue, the CLI as a user runs it."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from cloudai.api import SubmitRequest
from cloudai.models import Resources, TaskStatus
from cloudai.runtime import DockerRuntime
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.e2e.conftest import Cli, run, submit
from tests.helpers import ROOT, cloudai, placing, wait_ended, wait_for, wait_started
from tests.services import TEST_IMAGE

S = TaskStatus


@pytest.fixture(params=["direct", "api"], autouse=True)
def mode(request: pytest.FixtureRequest, cli_session: Cli) -> str:
    """Every test here runs twice: every command through `cloudai server` with a token of the same user (and
    no Redis or store URL); and the changes through the master but the reads (monitor, logs, status, list,
    workers) in an operator's direct mode on Redis and the store. Same commands, same assertions."""
    cli_session.reads_via_master = request.param == "api"
    return str(request.param)


def test_submit_follow_prints_both_streams_and_exits_with_the_code(settings: Settings, workers) -> None:  # type: ignore[no-untyped-def]
    workers()
    result = run(settings, "submit", "-f", "-m", "64m", TEST_IMAGE, "--", "sh", "-c", "echo a; echo b >&2; exit 3")
    assert result.returncode == 3, result.stdout + result.stderr
    # Docker reads stdout and stderr through separate pipes: their relative order is Docker's
    assert sorted(result.stdout.splitlines()[:2]) == ["a", "b"]
    assert "Task Failed — exit 3" in result.stdout


def test_a_followed_submit_never_loads_redis_py(settings: Settings, workers, cli_session: Cli) -> None:  # type: ignore[no-untyped-def]
    """A user's CLI talks to the master with httpx alone: no redis-py, Celery, kombu or docker-py is imported
    (``-X importtime`` lists every import)."""
    workers()
    env = {**cli_session.master_env(), "PYTHONPROFILEIMPORTTIME": "1"}
    result = subprocess.run(cloudai("submit", "-f", "-m", "64m", TEST_IMAGE, "--", "echo", "hi"), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[0] == "hi"
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "cloudai.cli.remote" in imported  # the list is complete
    assert not sorted(m for m in imported if m.startswith("redis.") or m in ("celery", "kombu", "docker"))


def test_monitor_started_late_prints_everything(settings: Settings, store: SQLiteStore, workers) -> None:  # type: ignore[no-untyped-def]
    workers()
    task_id = submit(settings, "--shell", TEST_IMAGE, "for i in $(seq 1 200); do echo line $i; done")
    wait_for(lambda: (t := store.get_task(task_id)) and t.status.terminal, 60, what="task end")
    result = run(settings, "monitor", task_id)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert [ln for ln in out if ln.startswith("line ")] == [f"line {i}" for i in range(1, 201)]
    assert out[-1] == "Task Completed"
    assert any(ln.strip().startswith("task:") and task_id in ln for ln in out)  # the header
    assert "Press any key" not in result.stdout  # no terminal: no key handling
    logs = run(settings, "logs", "--tail", "3", task_id)
    assert logs.stdout.splitlines()[:3] == ["line 198", "line 199", "line 200"]
    stamped = run(settings, "logs", "--timestamps", "--tail", "1", task_id).stdout.splitlines()[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z line 200", stamped), stamped


def test_status_json_of_an_oom_killed_task(settings: Settings, store: SQLiteStore, workers) -> None:  # type: ignore[no-untyped-def]
    workers()
    task_id = submit(settings, "-m", "32m", "--shell", TEST_IMAGE, "x=$(head -c 200000000 /dev/zero | tr '\\0' a)")
    follow = run(settings, "logs", "-f", task_id)
    assert follow.returncode == 137
    assert "killed: out of memory, limit 32 MiB" in follow.stdout
    record = json.loads(run(settings, "status", "--json", task_id).stdout)
    assert record["status"] == "failed" and record["oom_killed"] is True and record["exit_code"] == 137
    assert record["error"]["message"] == "killed: out of memory, limit 32 MiB"


def test_cancel_stops_a_running_container(settings: Settings, store: SQLiteStore, workers) -> None:  # type: ignore[no-untyped-def]
    workers()
    task_id = submit(settings, "--shell", TEST_IMAGE, "sleep 300")
    running = wait_for(lambda: (t := store.get_task(task_id)) and t.started_at and t, 60, what="start")
    result = run(settings, "cancel", task_id)
    assert result.returncode == 0 and f"{task_id}: cancelled" in result.stdout, result.stdout + result.stderr
    assert DockerRuntime().inspect(running.container_id) is None
    follow = run(settings, "monitor", task_id)
    assert follow.returncode == 130 and "Task Cancelled" in follow.stdout


def test_seed_task_syntax_and_listing(settings: Settings, store: SQLiteStore, workers) -> None:  # type: ignore[no-untyped-def]
    proc = workers()
    result = run(settings, "task", proc.worker_id, TEST_IMAGE, "-cpu_cores", "0.5", "-mem", "0.25", "echo", "seed")
    assert result.returncode == 0, result.stderr
    task_id = result.stdout.split()[0]
    wait_for(lambda: store.get_task(task_id).status == S.COMPLETED, 60, what="seed task")  # type: ignore[union-attr]
    task = store.get_task(task_id)
    assert task is not None and task.req_cpu == 0.5 and task.memory_bytes == 256 * 1024 * 1024  # -mem is GB
    assert task.worker_id == proc.worker_id
    listing = json.loads(run(settings, "list", "--json").stdout)
    assert [t["task_id"] for t in listing] == [task_id]
    table = run(settings, "list").stdout
    assert task_id in table and "completed" in table and "0.5 CPU, 256 MiB" in table
    assert proc.worker_id in run(settings, "workers").stdout
    workers_json = json.loads(run(settings, "workers", "--json").stdout)
    assert workers_json[0]["worker_id"] == proc.worker_id and workers_json[0]["alive"] is True
    assert workers_json[0]["slots"] == 4  # worker start --concurrency 4: its task slots


def test_pending_tasks_run_when_capacity_frees_in_order(settings: Settings, store: SQLiteStore, workers) -> None:  # type: ignore[no-untyped-def]
    workers(None, "--cpus", "1", "--memory", "1g", "--gpus", "none")
    api = placing(settings)  # submits in one process: quick enough that the first is still running
    api.start_placer()  # as the master does: the worker only signals when a task ends
    ids = [api.submit(SubmitRequest(TEST_IMAGE, "sleep 1", Resources.parse(cpus=1))).task_id for _ in range(3)]
    assert [store.get_task(i).status for i in ids[1:]] == [S.PENDING, S.PENDING]  # type: ignore[union-attr]
    for task_id in ids:
        wait_for(lambda tid=task_id: store.get_task(tid).status == S.COMPLETED, 60, what=task_id)  # type: ignore[misc, union-attr]
    api.stop_placer()
    starts = [store.get_task(i).started_at for i in ids]  # type: ignore[union-attr]
    assert starts == sorted(starts)  # type: ignore[type-var]


@pytest.mark.timeout(240)
def test_worker_killed_mid_task_reattaches_without_repeating_lines(
    settings: Settings, store: SQLiteStore, workers  # type: ignore[no-untyped-def]
) -> None:
    proc = workers()
    task_id = submit(settings, "--shell", TEST_IMAGE, "for i in $(seq 1 60); do echo line $i; sleep 0.1; done")
    before = wait_started(store, task_id, 60)
    time.sleep(1.5)
    proc.kill()  # SIGKILL: no clean shutdown, the container keeps running
    assert DockerRuntime().is_running(before.container_id)
    time.sleep(1.0)
    workers(proc.worker_id)  # the same worker comes back
    done = wait_ended(store, task_id, 90)
    assert done.status == S.COMPLETED and done.exit_code == 0
    assert done.container_id == before.container_id  # no second container
    result = run(settings, "logs", task_id)
    assert [ln for ln in result.stdout.splitlines() if ln.startswith("line")] == [f"line {i}" for i in range(1, 61)]


@pytest.mark.timeout(240)
def test_task_that_ends_while_its_worker_is_down_is_recorded_on_return(
    settings: Settings, store: SQLiteStore, workers  # type: ignore[no-untyped-def]
) -> None:
    proc = workers()
    task_id = submit(settings, "--shell", TEST_IMAGE, "for i in $(seq 1 20); do echo line $i; sleep 0.1; done; exit 7")
    before = wait_started(store, task_id, 60)
    proc.kill()
    runtime = DockerRuntime()
    wait_for(lambda: not runtime.is_running(before.container_id), 60, what="container exit")
    assert store.get_task(task_id).status == S.RUNNING  # type: ignore[union-attr]  # nobody knows yet
    workers(proc.worker_id)
    done = wait_ended(store, task_id, 60)
    assert (done.status, done.exit_code) == (S.FAILED, 7)
    result = run(settings, "logs", "-f", task_id)
    assert result.returncode == 7
    assert [ln for ln in result.stdout.splitlines() if ln.startswith("line")] == [f"line {i}" for i in range(1, 21)]
    assert runtime.inspect(before.container_id) is None


def test_gpu_worker_reserves_exact_ids_and_a_gpu_task_fails_clearly_without_nvidia(
    settings: Settings, store: SQLiteStore, workers  # type: ignore[no-untyped-def]
) -> None:
    proc = workers(None, "--cpus", "4", "--memory", "8g", "--gpus", "0,1", "--label", "gpu=test")
    info = json.loads(run(settings, "workers", "--json").stdout)[0]
    assert info["gpu_ids"] == ["0", "1"] and info["labels"] == {"gpu": "test"}
    result = run(settings, "submit", "-f", "--gpus", "1", "--constraint", "gpu=test", TEST_IMAGE, "nvidia-smi")
    task = store.list_tasks(limit=1)[0]
    assert task.gpu_ids == ["0"] and task.worker_id == proc.worker_id
    if task.status == S.FAILED and task.exit_code is None:  # no NVIDIA runtime here: Docker refuses
        assert result.returncode == 125, result.stdout + result.stderr
        assert task.error is not None and "docker could not" in task.error.message
    too_many = run(settings, "submit", "--gpus", "3", TEST_IMAGE, "true")
    assert too_many.returncode == 2 and "lower the request or add a worker" in too_many.stderr


def test_clean_shutdown_marks_the_worker_offline(settings: Settings, store: SQLiteStore, workers) -> None:  # type: ignore[no-untyped-def]
    proc = workers()
    proc.stop()
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()[-2000:]
    assert store.get_worker(proc.worker_id).state.value == "offline"  # type: ignore[union-attr]


@pytest.mark.timeout(240)
def test_clean_restart_does_not_wait_for_long_tasks_and_reattaches(
    settings: Settings, store: SQLiteStore, workers  # type: ignore[no-untyped-def]
) -> None:
    proc = workers()
    task_id = submit(settings, "--shell", TEST_IMAGE, "for i in $(seq 1 50); do echo line $i; sleep 0.2; done")
    before = wait_started(store, task_id, 60)
    time.sleep(1.0)
    proc.stop()  # SIGTERM: Celery's warm shutdown
    assert proc.proc is not None and proc.proc.returncode == 0
    # the worker is gone while its task's 10 s loop still runs: the shutdown did not wait for the task
    assert DockerRuntime().is_running(before.container_id), "shutdown waited for the task"
    assert store.get_task(task_id).status == S.RUNNING  # type: ignore[union-attr]
    assert store.get_worker(proc.worker_id).state.value == "active"  # type: ignore[union-attr]  # it holds a task
    workers(proc.worker_id)
    done = wait_ended(store, task_id, 90)
    assert done.status == S.COMPLETED and done.container_id == before.container_id
    lines = run(settings, "logs", task_id).stdout.splitlines()
    assert [ln for ln in lines if ln.startswith("line")] == [f"line {i}" for i in range(1, 51)]
