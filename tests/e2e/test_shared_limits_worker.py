"""Issue 23, the worker's side and the scheduler's: what one user can no longer take from everyone (rows 4-8 of
its table). Each test runs a real `cloudai server` and, where a container must run, a real `cloudai worker
start` on real Docker, Redis and a SQLite store; each failed on the code before: slots and waiting tasks held by
one user, an uncapped --timeout, placement passes run inside other users' requests, a fixed pids limit per task
whatever the host has, no bound on the disk a task writes, image pulls from any address with the registry's
answer in the task's reason, and labels in the namespaces of the host's tools."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
from collections.abc import Callable

import httpx
import pytest

from cloudai import pidbudget
from cloudai.models import Task, TaskStatus, new_task_id
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.e2e.conftest import Masters
from tests.helpers import ROOT, ServerProc, cli_env, cloudai, register, wait_for
from tests.services import TEST_IMAGE

S = TaskStatus
Master = Callable[..., ServerProc]


@pytest.fixture
def master(masters: Masters) -> Master:
    """``master(CLOUDAI_X="1", ...)``: a real `cloudai server` with these settings (stopped after the test)."""
    return lambda **env: masters(**env)


def cli(server: ServerProc, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``cloudai ARGS`` as ``user`` through ``server``."""
    return subprocess.run(cloudai(*args), cwd=ROOT, env=server.cli_env(server.token(user)), capture_output=True,
                          text=True, timeout=120)


def submit(server: ServerProc, user: str, *args: str) -> dict[str, object]:
    """``cloudai submit --json ARGS`` as ``user``: the recorded task."""
    result = cli(server, user, "submit", "--json", *args)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def ended(store: SQLiteStore, task_id: str, timeout: float = 120) -> Task:
    return wait_for(lambda: _terminal(store, task_id), timeout, 0.1, f"task {task_id} to end")


def _terminal(store: SQLiteStore, task_id: str) -> Task | None:
    task = store.get_task(task_id)
    return task if task is not None and task.status.terminal else None


# -- slots and fairness ---------------------------------------------------------------------------------------

def test_a_default_running_quota_leaves_slots_to_others(master: Master, workers, store: SQLiteStore) -> None:  # type: ignore[no-untyped-def]
    """Row 5: 16 tiny sleepers held every slot of the worker. With a default per-user quota of running tasks,
    the rest of one user's tasks wait (saying why) and another user's task starts at once."""
    server = master(CLOUDAI_DEFAULT_QUOTA_TASKS="2")
    workers()  # 4 slots
    hog = [submit(server, "hog", "--cpus", "0.01", "-m", "6m", TEST_IMAGE, "--", "sleep", "600") for _ in range(4)]
    assert [t["status"] for t in hog] == ["queued", "queued", "pending", "pending"]
    assert hog[2]["pending_reason"] == "quota: hog uses 2 of 2 tasks"
    other = submit(server, "ana", TEST_IMAGE, "--", "echo", "mine")
    assert other["status"] == "queued"  # a slot was left for her
    assert ended(store, str(other["task_id"])).status == S.COMPLETED
    shown = json.loads(cli(server, "hog", "quota", "--json").stdout)
    assert shown["quota"]["tasks"] == 2 and shown["used"]["tasks"] == 2 and shown["used"]["waiting"] == 2


def test_waiting_tasks_past_the_quota_are_refused_and_nothing_is_recorded(master: Master, store: SQLiteStore,
                                                                         settings: Settings) -> None:
    """Row 5: 3,000 waiting tasks in 7 s. Past the default waiting-task quota a submit is refused (exit 2) with
    what to do; the user's tasks within it and other users are not touched; an admin's quota raises it."""
    register(store, settings.worker_id, cpus=1, slots=4)  # its queue stays unconsumed: tasks stay where placed
    server = master(CLOUDAI_DEFAULT_QUOTA_WAITING="3")
    first = submit(server, "hog", "--cpus", "1", TEST_IMAGE, "--", "sleep", "600")
    waiting = [submit(server, "hog", "--cpus", "1", TEST_IMAGE, "--", "sleep", "600") for _ in range(3)]
    assert first["status"] == "queued" and [t["status"] for t in waiting] == ["pending"] * 3
    refused = cli(server, "hog", "submit", "--cpus", "1", TEST_IMAGE, "--", "sleep", "600")
    assert refused.returncode == 2, refused.stderr
    assert "hog already has 3 waiting tasks, the most allowed (3;" in refused.stderr
    assert "cancel some (`cloudai list --status pending`)" in refused.stderr
    assert len(store.list_tasks(user_id="hog", limit=None)) == 4  # nothing recorded
    r = httpx.post(f"{server.url}/v1/tasks", json={"image": TEST_IMAGE, "command": "true", "cpus": 1},
                   headers={"Authorization": f"Bearer {server.token('hog')}"}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["type"] == "TooManyWaiting"
    assert submit(server, "ana", "--cpus", "1", TEST_IMAGE, "--", "true")["status"] == "pending"  # not hog's cap
    raised = subprocess.run(cloudai("admin", "quota", "set", "hog", "--waiting", "10"), cwd=ROOT,
                            env=cli_env(server.settings), capture_output=True, text=True, timeout=60)
    assert raised.returncode == 0, raised.stderr
    assert submit(server, "hog", "--cpus", "1", TEST_IMAGE, "--", "sleep", "600")["status"] == "pending"


def test_timeout_is_capped_and_defaults_to_the_cap(master: Master, store: SQLiteStore, settings: Settings) -> None:
    """Row 5: --timeout 366d held a slot for a year. Past the operator's cap a submit is refused; a task that
    gives none gets the cap (so leaving it out is no way around it)."""
    register(store, settings.worker_id)
    server = master()  # the default cap: 7 days
    refused = cli(server, "hog", "submit", "--timeout", "366d", TEST_IMAGE, "--", "sleep", "3600")
    assert refused.returncode == 2
    assert "the longest a task may run on this cluster is 7d (CLOUDAI_MAX_TIMEOUT)" in refused.stderr
    assert store.list_tasks(user_id="hog", limit=None) == []
    assert submit(server, "hog", "--timeout", "7d", TEST_IMAGE, "--", "true")["timeout_s"] == 7 * 86400
    assert submit(server, "hog", TEST_IMAGE, "--", "true")["timeout_s"] == 7 * 86400


def test_placement_passes_never_run_in_another_users_request(master: Master, store: SQLiteStore) -> None:
    """Row 5: a cancel took 7 -> 380 ms because the placement pass over one user's 3,000 waiting tasks ran inside
    it. A cancel that frees capacity now only signals the master's placer: when ana's cancel returns, the pass
    over hog's waiting tasks has not run in it (it runs right after, on the placer)."""
    server = master()
    for _ in range(600):  # hog's waiting tasks, each with a reason a pass will rewrite (no worker is active)
        store.create_task(Task(task_id=new_task_id(), user_id="hog", docker_image=TEST_IMAGE, command="true",
                               status=S.PENDING, pending_reason="stale"))
    mine = Task(task_id=new_task_id(), user_id="ana", docker_image=TEST_IMAGE, command="true", status=S.PENDING,
                pending_reason="stale")
    store.create_task(mine)
    r = httpx.post(f"{server.url}/v1/tasks/{mine.task_id}/cancel", timeout=60,
                   headers={"Authorization": f"Bearer {server.token('ana')}"})
    reasons = [t.pending_reason for t in store.list_tasks(user_id="hog", limit=None)]
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert "stale" in reasons  # the pass had not run in ana's request ...
    wait_for(lambda: all(t.pending_reason != "stale" for t in store.list_tasks(user_id="hog", limit=None)), 120,
             0.2, "the placer's pass")  # ... and it ran on the placer
    assert store.get_task(mine.task_id).status == S.CANCELLED  # type: ignore[union-attr]


# -- PIDs -------------------------------------------------------------------------------------------------------

def test_a_fork_loop_is_held_to_the_workers_pid_share(master: Master, workers, store: SQLiteStore,  # type: ignore[no-untyped-def]
                                                      settings: Settings) -> None:
    """Row 6: one task reached 4,095 PIDs and 16 x 4,096 is more than pid_max. Each task gets its share of the
    host's budget (host limit less the reserve, over the slots): the sum over the worker's slots fits."""
    host = pidbudget.host_limit()
    assert host is not None
    share = 100
    reserve = host - 4 * share  # the worker runs 4 slots: each gets 100
    worker = workers(env={"CLOUDAI_PIDS_RESERVE": str(reserve)})
    server = master()
    loop = ("read m 2>/dev/null < /sys/fs/cgroup/pids.max || read m < /sys/fs/cgroup/pids/pids.max; "
            "echo pids.max=$m; n=0; while [ $n -lt 1000 ]; do sleep 600 & n=$((n+1)); echo started $n; done; "
            "echo all started")
    task = ended(store, str(submit(server, "hog", "--shell", TEST_IMAGE, "--", loop)["task_id"]))
    log = cli(server, "hog", "logs", task.task_id).stdout.splitlines()
    assert log[0] == f"pids.max={share}"
    started = [int(line.split()[1]) for line in log if line.startswith("started ")]
    assert "all started" not in log and max(started) < share  # the shell itself holds one of them
    assert task.status == S.FAILED  # busybox sh stops at "can't fork"
    info = store.get_worker(worker.worker_id)  # the share is in the worker's record
    assert info is not None and info.pids_limit == share and info.slots * info.pids_limit <= host - reserve


# -- disk -------------------------------------------------------------------------------------------------------

def test_a_task_writing_past_its_disk_budget_is_stopped(master: Master, workers, store: SQLiteStore) -> None:  # type: ignore[no-untyped-def]
    """Row 4: `dd` of 3 GiB into /tmp of a 64 MiB task reached the host's disk. This storage driver can't bound
    a writable layer: the worker says so and its disk guard stops a task past its budget, saying why."""
    worker = workers(env={"CLOUDAI_TASK_DISK": "64m", "CLOUDAI_DISK_CHECK_INTERVAL": "0.5"})
    server = master()
    fill = "dd if=/dev/zero of=/tmp/fill bs=1M count=200 2>/dev/null; echo written; sleep 600"
    task = ended(store, str(submit(server, "hog", "-m", "64m", "--shell", TEST_IMAGE, "--", fill)["task_id"]))
    assert task.status == S.FAILED and task.error is not None and task.error.type == "DiskLimit"
    assert task.error.message.startswith("disk: wrote ") and ", limit 64 MiB; the task was stopped" in \
        task.error.message
    small = submit(server, "hog", "--storage", "100m", "--shell", TEST_IMAGE, "--",
                   "dd if=/dev/zero of=/tmp/fill bs=1M count=20 2>/dev/null; sleep 2; echo fine")
    assert ended(store, str(small["task_id"])).status == S.COMPLETED  # within its own budget
    info = store.get_worker(worker.worker_id)  # the worker said at start how it bounds a task's disk
    assert info is not None and info.disk_quota is False and info.pressure is None
    assert "can't bound a container's writable layer here" in worker.log()


def test_a_worker_short_of_disk_takes_no_new_task_and_says_why(master: Master, workers, store: SQLiteStore,  # type: ignore[no-untyped-def]
                                                                settings: Settings) -> None:
    """A worker whose Docker data root has less free space than it keeps is skipped by placement, as a draining
    one is, and its record and the task's reason say why."""
    worker = workers(env={"CLOUDAI_DISK_MIN_FREE": "60t"})
    server = master()
    task = submit(server, "hog", TEST_IMAGE, "--", "true")
    assert task["status"] == "pending"
    info = store.get_worker(worker.worker_id)
    assert info is not None and info.pressure is not None
    assert info.pressure.startswith("disk: ") and "(CLOUDAI_DISK_MIN_FREE)" in info.pressure
    assert task["pending_reason"] == f"worker {settings.worker_id} takes no new task: {info.pressure}"
    listed = json.loads(cli(server, "hog", "workers", "--json").stdout)
    assert [w["pressure"] for w in listed] == [info.pressure]


# -- the worker's network ---------------------------------------------------------------------------------------

class _Registry(http.server.BaseHTTPRequestHandler):
    """A "registry" that answers 404 with a body only it knows (as the master's own port did in the report)."""

    BODY = b'{"error": "SECRET-BODY-of-this-port"}'

    def do_GET(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", str(len(self.BODY)))
        self.end_headers()
        self.wfile.write(self.BODY)

    do_HEAD = do_GET

    def log_message(self, *_: object) -> None:
        pass


def test_images_from_local_addresses_are_refused_and_pull_errors_say_little(master: Master, workers,  # type: ignore[no-untyped-def]
                                                                            store: SQLiteStore,
                                                                            settings: Settings) -> None:
    """Row 7: `--pull always 127.0.0.1:18201/probe:1` made the engine fetch from a loopback port and put that
    port's 404 body in the task's reason. A loopback registry is refused at submit; where an operator allows one,
    a failed pull says "not found", never what the registry sent."""
    registry = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    threading.Thread(target=registry.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{registry.server_address[1]}"
    register(store, settings.worker_id)  # a worker could take it: only the policy refuses
    try:
        strict = master()
        refused = cli(strict, "hog", "submit", "--pull", "always", f"{host}/probe:1", "--", "true")
        assert refused.returncode == 2
        assert f"its registry {host} is not allowed on this cluster; allowed registries " \
               "(CLOUDAI_ALLOWED_REGISTRIES): docker.io, ghcr.io, quay.io, nvcr.io" in refused.stderr
        any_public = master(CLOUDAI_ALLOWED_REGISTRIES="*")
        for image in ("169.254.169.254/latest:1", "10.0.0.1:5000/x:1", "localhost:5000/x:1"):
            said = cli(any_public, "hog", "submit", image, "--", "true")
            assert said.returncode == 2 and "address, which tasks may not pull from" in said.stderr, image
        any_public.stop()
        assert store.list_tasks(limit=None) == []
        allowed = {"CLOUDAI_ALLOWED_REGISTRIES": f"docker.io,{host}"}  # this test's operator allows the port
        workers(env=allowed)
        server = master(**allowed)
        task = ended(store, str(submit(server, "hog", "--pull", "always", f"{host}/probe:1", "--", "true")["task_id"]))
    finally:
        registry.shutdown()
    assert task.status == S.FAILED and task.error is not None and task.error.type == "ImageError"
    assert task.error.message == (f"image '{host}/probe:1' could not be pulled: not found (no such repository or "
                                  "tag, or no access to it)")
    assert "SECRET" not in cli(server, "hog", "status", task.task_id).stdout


# -- labels -----------------------------------------------------------------------------------------------------

def test_labels_in_the_host_tools_namespaces_are_refused(master: Master, workers, store: SQLiteStore) -> None:  # type: ignore[no-untyped-def]
    """Row 8: `-l traefik.http.routers.x.rule=...` put a Traefik route on the host. Reserved prefixes (an
    operator list) are refused at submit with the key and the rule; a user's own labels are kept."""
    workers()
    server = master()
    for label in ("traefik.http.routers.x.rule=Host(`evil`)", "com.docker.compose.project=x",
                  "com.centurylinklabs.watchtower.enable=true", "Traefik.enable=true"):
        refused = cli(server, "hog", "submit", "-l", label, TEST_IMAGE, "--", "true")
        assert refused.returncode == 2, label
        assert "are reserved on this cluster" in refused.stderr and "CLOUDAI_RESERVED_LABEL_PREFIXES" in \
            refused.stderr
    assert store.list_tasks(limit=None) == []
    task = ended(store, str(submit(server, "hog", "-l", "team=ml", TEST_IMAGE, "--", "true")["task_id"]))
    assert task.status == S.COMPLETED and task.labels == {"team": "ml"}
