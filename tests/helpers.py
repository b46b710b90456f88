"""Helpers for tests on real services."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import redis

from cloudai.api import CloudAI
from cloudai.executor import Executor
from cloudai.logs import LogBus
from cloudai.models import GiB, Task, TaskStatus, WorkerInfo, show_command, utcnow
from cloudai.runoptions import shell_args
from cloudai.runtime import DockerRuntime
from cloudai.settings import Settings
from cloudai.store import TaskStore
from tests.services import TEST_IMAGE

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def wait_for(check: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        time.sleep(interval)


def wait_started(store: TaskStore, task_id: str, timeout: float = 60) -> Task:
    """The task once its container has started."""
    return wait_for(lambda: (t := store.get_task(task_id)) and t.container_id and t.started_at and t, timeout,
                    what=f"task {task_id} to start")


def wait_ended(store: TaskStore, task_id: str, timeout: float = 90, interval: float = 0.05) -> Task:
    """The task once it reached a terminal status."""
    return wait_for(lambda: (t := store.get_task(task_id)) and t.status.terminal and t, timeout, interval,
                    f"task {task_id} to end")


def executor(settings: Settings, store: TaskStore, runtime: DockerRuntime | None = None) -> Executor:
    bus = LogBus.from_url(settings.redis_url)
    return Executor(settings, store, bus, runtime or DockerRuntime(), bus.redis)


def task_pids_limit(settings: Settings) -> int:
    """The pids limit an executor with ``settings`` gives each task on this host (cloudai.pidbudget)."""
    from cloudai import pidbudget

    return pidbudget.per_task(settings.pids_limit, pidbudget.host_limit(), settings.pids_reserve,
                              settings.worker_concurrency)


def message(task: Task) -> dict[str, Any]:
    """The queue message the scheduler sends for ``task`` (the only wire format)."""
    from cloudai.message import RunMessage

    return RunMessage.from_task(task).to_wire()


def register(store: TaskStore, worker_id: str, cpus: float = 4, memory: int = 8 * GiB,
             gpu_ids: list[str] | None = None, labels: dict[str, str] | None = None, slots: int = 64) -> WorkerInfo:
    info = WorkerInfo(worker_id=worker_id, hostname="test", queue=f"cloudai.worker.{worker_id}", cpus=cpus,
                      memory=memory, gpu_ids=gpu_ids or [], labels=labels or {}, slots=slots)
    store.upsert_worker(info)
    return info


def queued_task(store: TaskStore, worker_id: str, command: str | None, image: str = TEST_IMAGE,
                **fields: Any) -> Task:
    """A task recorded as queued on ``worker_id`` (what the scheduler does), for executor tests. ``command`` is a
    shell line (run as ``/bin/sh -c``, what ``submit --shell`` records); ``args=[...]`` gives arguments instead."""
    fields.setdefault("status", TaskStatus.QUEUED)
    if command is not None:
        fields.setdefault("args", list(shell_args(command)))
    fields.setdefault("user_id", "tester")
    task = Task(task_id=f"t{time.monotonic_ns() % 10**12:012d}", docker_image=image,
                command=show_command(fields.get("args", []), fields.get("entrypoint")), worker_id=worker_id,
                created_at=utcnow(), **fields)
    store.create_task(task)
    return task


def run_in_thread(fn: Callable[..., T], *args: Any) -> tuple[threading.Thread, list[T]]:
    out: list[T] = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    thread.start()
    return thread, out


def placing(settings: Settings) -> CloudAI:
    """The cluster as the master sees it: placing tasks and sending real Celery messages to workers' queues."""
    from cloudai.celery_app import dispatcher, make_app

    return CloudAI(settings, dispatcher(make_app(settings)))


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CLOUDAI_") or k in ("CLOUDAI_TEST_IMAGE", "CLOUDAI_CMDSERVER_DIR")}
    env.update({
        "CLOUDAI_REDIS_URL": settings.redis_url,
        "CLOUDAI_STORE_URL": settings.store_url,
        "CLOUDAI_USER": settings.user,
        "CLOUDAI_HEARTBEAT_INTERVAL": str(settings.heartbeat_interval_s),
        "CLOUDAI_HEARTBEAT_TIMEOUT": str(settings.heartbeat_timeout_s),
        "CLOUDAI_BEAT_INTERVAL": str(settings.beat_interval_s),
        "CLOUDAI_STOP_GRACE": str(settings.stop_grace_s),
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def cloudai(*args: str) -> list[str]:
    """``cloudai ARGS`` as the console script runs it: through the session's command server (tests/conftest.py
    points ``CLOUDAI_CMDSERVER_DIR`` at a directory of its own), or in its own process where it must."""
    return [sys.executable, "-m", "cloudai.cli.launch", *args]


class WorkerProc:
    """A real `cloudai worker start` subprocess."""

    def __init__(self, settings: Settings, store: TaskStore, worker_id: str, log_dir: Path, *flags: str,
                 env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.env = env or {}  # more CLOUDAI_* settings of the worker (its limits)
        self.store = store
        self.worker_id = worker_id
        self.env = env or {}  # more environment for the worker (operator settings such as CLOUDAI_LOG_MAX_BYTES)
        self.log_path = log_dir / f"worker-{worker_id}-{time.monotonic_ns()}.log"
        self.flags = flags or ("--cpus", "4", "--memory", "8g", "--gpus", "none")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> WorkerProc:
        before = self.store.get_worker(self.worker_id)
        since = before.started_at if before else None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cloudai("worker", "start", "--id", self.worker_id, "--concurrency", "4", *self.flags),
                cwd=ROOT, env=cli_env(self.settings, **self.env), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            def registered() -> bool:
                w = self.store.get_worker(self.worker_id)
                return w is not None and w.started_at != since and self._ready()

            wait_for(registered, 60, 0.1, f"worker {self.worker_id} to start (log: {self.log_path})")
        return self

    def _ready(self) -> bool:
        return b" ready." in self.log_path.read_bytes()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def remove_containers(worker_id: str) -> None:
    runtime = DockerRuntime()
    for c in runtime.find(worker_id=worker_id):
        runtime.remove(c["Id"])


def flush(url: str) -> None:
    redis.Redis.from_url(url).flushdb()


class ServerProc:
    """A real `cloudai server` subprocess on a free port of 127.0.0.1, with tokens made in its store."""

    def __init__(self, settings: Settings, store: TaskStore, log_dir: Path, *flags: str,
                 ca_file: str | None = None, env: dict[str, str] | None = None) -> None:
        from tests.services import free_port

        self.settings = settings
        self.store = store
        self.flags = flags
        self.env = env or {}  # more CLOUDAI_* settings of the server (its limits)
        self.ca_file = ca_file  # with --ssl-certfile: the certificate clients trust
        self.port = free_port()
        self.url = f"{'https' if ca_file else 'http'}://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProc:
        import ssl

        import httpx

        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cloudai("server", "--port", str(self.port), "--log-level", "warning",
                                                 *self.flags),
                                         cwd=ROOT, env=cli_env(self.settings, **self.env), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

        def healthy() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log_path.read_text()
            try:
                return httpx.get(self.url + "/healthz", timeout=2, verify=verify).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 60, 0.1, f"cloudai server (log: {self.log_path})")
        return self

    def token(self, user: str, admin: bool = False, expires: str | None = None) -> str:
        from cloudai import tokens

        return tokens.create(self.store, user, admin, expires)[0]

    def cli_env(self, token: str, **extra: str) -> dict[str, str]:
        """A CLI environment that reaches the cluster only through this server: its Redis and store URLs point
        nowhere, so a command that tried them would fail."""
        return cli_env(self.settings, CLOUDAI_API_URL=self.url, CLOUDAI_TOKEN=token,
                       CLOUDAI_REDIS_URL="redis://unused.invalid:1/0", CLOUDAI_STORE_URL="sqlite:////nonexistent/x",
                       XDG_CONFIG_HOME=str(self.log_path.parent / "xdg"), **extra)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def capture_events(celery_app: Any, redis_client: Any, kind: str, count: int) -> list[dict[str, Any]]:
    """Start a Celery event receiver for ``kind`` events on a thread and return the list it fills (up to
    ``count``); returns once the receiver is subscribed, so events sent from now on arrive."""
    events: list[dict[str, Any]] = []
    ready = threading.Event()

    def listen() -> None:
        with celery_app.connection_for_read() as conn:
            def received(event: dict[str, Any]) -> None:
                events.append(event)
                receiver.should_stop = len(events) >= count

            receiver = celery_app.events.Receiver(conn, handlers={kind: received})
            receiver.on_consume_ready = lambda *args, **kwargs: ready.set()
            receiver.capture(timeout=15, wakeup=False)

    threading.Thread(target=listen, daemon=True).start()
    assert ready.wait(10)
    # ready fires before kombu sends its PSUBSCRIBE (from the receiver's first read): events published in
    # between are lost (pub/sub keeps nothing), which a loaded machine makes likely
    wait_for(lambda: int(redis_client.pubsub_numpat()) > 0, 10, what="the event receiver's subscription")
    return events


def _processes(field: str) -> Iterator[tuple[int, bytes]]:
    """Each live process's pid and its ``/proc/PID/<field>`` file."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                yield int(entry), Path(f"/proc/{entry}/{field}").read_bytes()
            except OSError:  # it ended meanwhile
                continue


def proc_stat(pid: int) -> list[str]:
    """``/proc/PID/stat`` after the command's name: state, ppid, pgrp, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children_of(pid: int) -> list[int]:
    """The pids of a process's children."""
    return [child for child, stat in _processes("stat") if int(stat.rsplit(b")", 1)[1].split()[1]) == pid]


def cmdservers_in(folder: str) -> list[int]:
    """The pids of the command servers whose socket is in ``folder``, and of their runners and commands (forks of
    a server, with its command line)."""
    return [pid for pid, raw in _processes("cmdline") if b"cloudai.cli.cmdserver" in (cmdline := raw.split(b"\0"))
            and any(arg.startswith(folder.encode()) for arg in cmdline)]


# An image with an ENTRYPOINT that prints first and then runs its arguments, and a CMD, as NGC's and conda's
# images have: built locally from the test image (FROM scratch + its files, so / is 0755 and a non-root user can
# run it; the test image's own root directory is 0700). No registry needed.
ENTRYPOINT_DOCKERFILE = """FROM scratch
ADD rootfs.tar /
ENTRYPOINT ["/bin/sh", "-c", "echo entrypoint-ran; exec \\"$@\\"", "entrypoint"]
CMD ["echo", "default-cmd"]
"""


def entrypoint_image() -> str:
    """The tag of that image, built once per Dockerfile text."""
    import hashlib
    import tempfile

    from tests.services import TEST_IMAGE

    tag = "cloudai-test/entrypoint:" + hashlib.sha256(ENTRYPOINT_DOCKERFILE.encode()).hexdigest()[:12]
    if subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0:
        return tag
    with tempfile.TemporaryDirectory() as folder:
        container = subprocess.run(["docker", "create", TEST_IMAGE], capture_output=True, text=True,
                                   check=True).stdout.strip()
        try:
            subprocess.run(["docker", "export", container, "-o", f"{folder}/rootfs.tar"], check=True)
        finally:
            subprocess.run(["docker", "rm", container], capture_output=True)
        Path(folder, "Dockerfile").write_text(ENTRYPOINT_DOCKERFILE)
        subprocess.run(["docker", "build", "-q", "-t", tag, folder], capture_output=True, check=True)
    return tag


def docker_run(*args: str) -> tuple[list[str], int]:
    """``docker run --rm ARGS``: its output lines (stdout and stderr) and exit code, to compare a task with."""
    result = subprocess.run(["docker", "run", "--rm", *args], capture_output=True, text=True, timeout=120)
    return (result.stdout + result.stderr).splitlines(), result.returncode
