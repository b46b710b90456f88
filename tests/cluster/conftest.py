"""The simulated cluster (scripts/cluster) for the tests of this folder: brought up once for the module with a
name of its own, always taken down (namespaces deleted, dockerds and every process stopped), even when a test or
the set-up failed. Needs root and network namespaces: without them the tests fail under CI and are skipped
elsewhere, as every other required service (tests/services.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudai import keys
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import ROOT, wait_for
from tests.services import missing

SCRIPT = ROOT / "scripts" / "cluster"
HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TIMEOUT_S = 10.0  # well above a Sentinel failover (~3 s): workers must not self-fence during one
TERMINAL = {"completed", "failed", "cancelled", "timeout", "lost"}


def _can_make_namespaces() -> str | None:
    """Why this machine can't run the simulated cluster, or None."""
    if os.geteuid() != 0:
        return "the simulated cluster needs root (network namespaces, dockerd)"
    for tool in ("ip", "nsenter", "unshare", "setsid", "dockerd", "docker", "redis-server", "redis-sentinel"):
        if shutil.which(tool) is None:
            return f"the simulated cluster needs {tool} (./scripts/test installs what is missing)"
    probe = f"caiprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"network namespaces can't be made here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Cluster:
    """scripts/cluster's commands for one named cluster, and what the tests read back."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dir = ROOT / ".cache" / "cluster" / name
        # the set-up's own variables pass (where the virtualenv is, the test image); no cluster setting leaks in
        own = ("CLOUDAI_VENV", "CLOUDAI_LOCK", "CLOUDAI_TEST_IMAGE")
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("CLOUDAI_") or k in own},
                    "CLOUDAI_CLUSTER_NAME": name, "CLOUDAI_HEARTBEAT_INTERVAL": str(HEARTBEAT_INTERVAL_S),
                    "CLOUDAI_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S), "CLOUDAI_BEAT_INTERVAL": "1"}
        self.recorders: list[subprocess.Popen[bytes]] = []

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                                cwd=ROOT)
        if check:
            assert result.returncode == 0, f"scripts/cluster {' '.join(args)}: {result.stderr}\n{result.stdout}"
        return result

    # -- the user's and the operator's commands (through the master, from the laptop host)
    def cli(self, *args: str, admin: bool = False, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("cli", *(["--admin"] if admin else []), *args, check=check)

    def submit(self, *args: str) -> str:
        return self.cli("submit", "-q", "--cpus", "0.1", "--memory", "32m", *args).stdout.strip()

    def task(self, task_id: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.cli("status", task_id, "--json").stdout)
        return doc

    def tasks(self) -> dict[str, dict[str, Any]]:
        docs = json.loads(self.cli("list", "--limit", "1000", "--json").stdout)
        return {doc["task_id"]: doc for doc in docs}

    def workers(self) -> dict[str, dict[str, Any]]:
        return {doc["worker_id"]: doc for doc in json.loads(self.cli("workers", "--json", admin=True).stdout)}

    def wait_ended(self, task_ids: list[str], timeout: float = 120) -> dict[str, dict[str, Any]]:
        def ended() -> dict[str, dict[str, Any]] | None:
            docs = self.tasks()
            return docs if all(docs[t]["status"] in TERMINAL for t in task_ids) else None

        return wait_for(ended, timeout, 0.5, f"tasks {task_ids} to end")

    # -- faults
    def primary(self) -> str:
        return self.run("primary").stdout.strip()

    def stream_lines(self, task_id: str) -> set[int]:
        """The line numbers the task's live stream holds on the current primary (what Redis kept, not what a
        reader is shown: a reader fills a hole from the archive)."""
        code = ("import json, os, sys; from cloudai.redisconn import connect; "
                "c = connect(os.environ['CLOUDAI_REDIS_URL']); "
                "print(json.dumps([[i, f.get('n', '0')] for i, f in c.xrange(sys.argv[1])]))")
        out = self.run("exec", "ctl", "python", "-c", code, keys.log_stream(task_id)).stdout
        held: set[int] = set()
        for entry_id, count in json.loads(out):
            first = int(entry_id.split("-")[0])
            held.update(range(first, first + int(count)))
        return held

    def store(self) -> SQLiteStore:
        """The store the cluster's processes share (the record of truth), opened read-mostly by the test."""
        return SQLiteStore(str(self.dir / "store.db"))

    # -- what each host's dockerd did: every container event, recorded for the whole module
    def record_events(self) -> None:
        for host in ("w1", "w2"):
            out = open(self.dir / f"events-{host}.jsonl", "ab")  # noqa: SIM115 (the recorder's, closed with it)
            self.recorders.append(subprocess.Popen(
                ["docker", "-H", f"unix:///run/cloudai-cluster/{self.name}/{host}/docker.sock", "events",
                 "--format", "{{json .}}", "--filter", "type=container", "--filter", "label=cloudai.task_id"],
                stdout=out, stderr=subprocess.DEVNULL))
            out.close()

    def events(self, host: str, task_id: str, status: str) -> list[dict[str, Any]]:
        """``host``'s dockerd events of ``status`` (start, die, ...) for ``task_id``'s containers, in order."""
        found = []
        for line in (self.dir / f"events-{host}.jsonl").read_text().splitlines():
            event = json.loads(line)
            attributes = event.get("Actor", {}).get("Attributes", {})
            if event.get("status") == status and attributes.get("cloudai.task_id") == task_id:
                found.append(event)
        return found

    def stop_recording(self) -> None:
        for proc in self.recorders:
            proc.terminate()
            proc.wait(10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_down_orphans() -> None:
    """Test clusters of this worktree whose pytest is gone (killed before its teardown ran) are taken down."""
    for owner in (ROOT / ".cache" / "cluster").glob("t*.owner"):
        text = owner.read_text().strip()
        if text.isdigit() and not _alive(int(text)):
            Cluster(owner.name.removesuffix(".owner")).run("down", timeout=300, check=False)
            owner.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    why = _can_make_namespaces()
    if why is not None:
        missing(why)
    _take_down_orphans()
    name = "t" + uuid.uuid4().hex[:6]
    cluster = Cluster(name)
    owner = cluster.dir.with_name(f"{name}.owner")  # outside the state folder, which `up` makes anew
    owner.parent.mkdir(parents=True, exist_ok=True)
    owner.write_text(str(os.getpid()))
    started = time.monotonic()
    failed_before = request.session.testsfailed
    try:
        up = cluster.run("up", timeout=600, check=False)
        assert up.returncode == 0, f"scripts/cluster up failed:\n{up.stderr[-4000:]}"
        print(f"cluster {name} up in {time.monotonic() - started:.1f}s")
        cluster.record_events()
        yield cluster
    finally:
        cluster.stop_recording()
        down = cluster.run("down", timeout=300, check=False)
        owner.unlink(missing_ok=True)
        leftovers = [n for n in os.listdir("/run/netns") if n.startswith(f"{name}-")] if Path(
            "/run/netns").is_dir() else []
        assert down.returncode == 0 and not leftovers, f"scripts/cluster down: {down.stderr} {leftovers}"
        if request.session.testsfailed == failed_before:  # its logs are kept only where a test failed
            shutil.rmtree(cluster.dir, ignore_errors=True)
