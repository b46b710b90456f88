"""Many hosts, and Redis may fail (issue 25), on real processes: the simulated cluster of scripts/cluster (hosts
are network namespaces with their own addresses and dockerds; Redis is a primary, a replica and three
sentinels). Every user command goes through the master from the laptop host."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

from cloudai.models import WorkerInfo
from tests.cluster.conftest import HEARTBEAT_TIMEOUT_S, Cluster
from tests.helpers import wait_for
from tests.services import TEST_IMAGE as IMAGE

GAP = re.compile(r"\[cloudai\] (\d+) (?:earlier lines were trimmed|lines are missing)")


def numbered(lines: int, exit_code: int = 0, pause: str = "0.1") -> list[str]:
    """A task printing ``line 1`` .. ``line N``, one every ``pause`` seconds, then exiting with ``exit_code``."""
    loop = f"i=0; while [ $i -lt {lines} ]; do i=$((i+1)); echo line $i; sleep {pause}; done"
    return [IMAGE, "--", "sh", "-c", f"{loop}; exit {exit_code}"]


def assert_log_complete_or_gap_marked(text: str, lines: int) -> int:
    """``line 1`` .. ``line N`` in order, none twice; a hole only where a gap marker names it. Returns how many
    lines were gap-marked."""
    expected, marked = 1, 0
    for line in text.splitlines():
        if (gap := GAP.search(line)) is not None:
            expected += int(gap[1])
            marked += int(gap[1])
        elif (number := re.fullmatch(r"line (\d+)", line)) is not None:
            assert int(number[1]) == expected, f"line {number[1]} where line {expected} belongs:\n{text}"
            expected += 1
    assert expected == lines + 1, f"the log ends before line {lines}:\n{text}"
    return marked


def test_a_task_on_the_second_host_is_followed_through_the_master(cluster: Cluster) -> None:
    task_id = cluster.submit("--worker", "w2", IMAGE, "--", "sh", "-c",
                             "echo hello from $(hostname); for i in 1 2 3; do echo line $i; sleep 0.2; done; exit 3")
    followed = cluster.cli("monitor", task_id, check=False)  # from the laptop: it reaches only the master
    assert followed.returncode == 3, followed.stderr
    out = followed.stdout.splitlines()  # the task's header, then its log from the first line
    assert "hello from w2" in out, followed.stdout
    start = out.index("hello from w2")
    assert out[start:start + 4] == ["hello from w2", "line 1", "line 2", "line 3"], followed.stdout
    assert cluster.task(task_id)["worker_id"] == "w2"
    assert len(cluster.events("w2", task_id, "start")) == 1 and not cluster.events("w1", task_id, "start")


def test_the_redis_primary_killed_mid_run_of_20_tasks(cluster: Cluster) -> None:
    """All 20 end with their true outcome (their own exit codes), none runs twice, every log is complete or
    says where it has a gap, and the reservations are free again."""
    lines = 150
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda n: cluster.submit(*numbered(lines, n % 4)), range(20)))
    wait_for(lambda: all(t["status"] == "running" for t in (cluster.tasks()[i] for i in ids)), 120, 0.5,
             "all 20 tasks to run")
    old = cluster.primary()
    replica = "ctl2" if old == "ctl" else "ctl"
    # asynchronous replication, made visible: the replica receives nothing for a moment, so what the primary
    # takes meanwhile (log lines, heartbeats, attempt refreshes) exists on the primary only and dies with it
    cluster.run("hold-replication", replica)
    try:
        time.sleep(1.5)
        cluster.run("kill", old, "redis", "KILL")  # no shutdown, nothing flushed
        new = wait_for(lambda: (p := cluster.primary()) != old and p, 60, 0.2, "the sentinels' failover")
    finally:
        cluster.run("release-replication", replica)
    try:
        print(f"primary {old} killed; {new} promoted")
        ended = cluster.wait_ended(ids, 180)
    finally:
        cluster.run("start", old, "redis")  # back as a replica of the new primary
    lost = sum(lines - len(cluster.stream_lines(task_id) & set(range(1, lines + 1))) for task_id in ids)
    assert lost > 0, "the failover lost no log entry: the scenario did not happen"
    marked = 0
    for n, task_id in enumerate(ids):
        task = ended[task_id]
        assert (task["status"], task["exit_code"], task["attempt"]) == (
            "completed" if n % 4 == 0 else "failed", n % 4, 1), task
        starts = [e for host in ("w1", "w2") for e in cluster.events(host, task_id, "start")]
        assert len(starts) == 1, f"task {task_id} started {len(starts)} containers"
        marked += assert_log_complete_or_gap_marked(cluster.cli("logs", task_id, check=False).stdout, lines)
    print(f"log lines the failover lost from Redis: {lost}; read back from the archive: {lost - marked}; "
          f"gap-marked: {marked}")

    def reservations_free() -> bool:  # reconciled with the store (at once, or by beat's reconcile pass)
        return all(w["tasks"] == 0 and w["used_cpus"] == 0 and w["used_memory"] == 0
                   for w in cluster.workers().values() if w["state"] == "active")

    wait_for(reservations_free, 90, 1.0, "the reservations to be free")


def test_a_worker_host_partitioned_for_twice_its_heartbeat_timeout(cluster: Cluster) -> None:
    """w2 is cut off while it runs the task: it stops the container itself (self-fencing) before beat retries
    the task on w1; when its link returns nothing runs twice, and the task ends with its true outcome."""
    cluster.cli("workers", "drain", "w1", admin=True)  # so that the first attempt runs on w2
    try:
        task_id = cluster.submit("--retries", "1", IMAGE, "--", "sh", "-c",
                                 "echo start on $(hostname); i=0; while [ $i -lt 15 ]; do i=$((i+1)); "
                                 "echo tick $i; sleep 1; done; echo done on $(hostname)")
        wait_for(lambda: "tick 2" in cluster.cli("logs", task_id, check=False).stdout, 60, 0.5, "the task on w2")
    finally:
        cluster.cli("workers", "undrain", "w1", admin=True)
    cluster.run("partition", "w2")
    try:
        time.sleep(2 * HEARTBEAT_TIMEOUT_S)  # the partition's length is the scenario, not a bound checked
    finally:
        cluster.run("heal", "w2")
    task = cluster.wait_ended([task_id], 120)[task_id]
    assert (task["status"], task["exit_code"], task["attempt"], task["worker_id"]) == ("completed", 0, 2, "w1")
    log = cluster.cli("logs", task_id).stdout
    assert "start on w2" in log and "done on w1" in log and "done on w2" not in log
    assert "attempt 2 started on worker w1" in log
    # one copy at any time: w2's container was gone before w1's started, and w2 started nothing after
    first, second = cluster.events("w2", task_id, "start"), cluster.events("w1", task_id, "start")
    assert len(first) == 1 and len(second) == 1
    died = cluster.events("w2", task_id, "die")
    assert died and died[0]["timeNano"] < second[0]["timeNano"], "two copies ran at once"


def test_beat_killed_the_other_beat_ticks_on(cluster: Cluster) -> None:
    """Two beats on two hosts: with the one on ctl killed (SIGKILL, its job locks left to expire), the reaper
    still runs, so a worker that stops heartbeating still goes offline."""
    cluster.run("kill", "ctl", "beat", "KILL")
    store = cluster.store()
    try:
        # ticks the dead beat sent expire after two ticks: let them, so that what follows is the other beat's
        time.sleep(3)
        ghost = WorkerInfo(worker_id="ghost", hostname="ghost", queue="cloudai.worker.ghost", cpus=1,
                           memory=2**30, slots=1)
        store.upsert_worker(ghost)  # registered, then silent: only beat's reaper can declare it offline
        wait_for(lambda: (w := store.get_worker("ghost")) is not None and w.state.value == "offline",
                 HEARTBEAT_TIMEOUT_S * 4, 0.5, "the reaper of the beat on ctl2")
        assert "Sending due task reap-dead-workers" in (cluster.dir / "logs" / "ctl2.beat.log").read_text()
    finally:
        cluster.cli("workers", "remove", "ghost", "--force", admin=True, check=False)
        store.close()
        cluster.run("start", "ctl", "beat")
