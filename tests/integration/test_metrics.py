"""Prometheus metrics read over HTTP, as a scraper reads them: the master's ``GET /metrics`` (a real
``cloudai server`` process) and a worker's own endpoint (prometheus_client's server on a port)."""

from __future__ import annotations

import socket
from collections import Counter

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from cloudai import metrics
from cloudai.api import CloudAI, SubmitRequest
from cloudai.logs import LogBus
from cloudai.models import Resources, Task
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import ServerProc, register


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_master_serves_scheduler_metrics(api_server: ServerProc) -> None:
    got = httpx.get(f"{api_server.url}/metrics", timeout=30)
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/plain")
    families = {family.name for family in text_string_to_metric_families(got.text)}
    assert {"cloudai_sched_step_seconds", "cloudai_sched_placement_wait_seconds", "cloudai_tasks_waiting",
            "cloudai_submits", "cloudai_log_lines", "cloudai_log_bytes", "cloudai_reservations_drift"} <= families


def test_queue_depth_by_reason_and_submits(settings: Settings, store: SQLiteStore) -> None:
    sent: list[Task] = []
    api = CloudAI(settings, dispatch=sent.append)
    register(store, "w", cpus=1, slots=1)
    before = _samples(metrics_text())
    tasks = [api.submit(SubmitRequest(image="busybox", command="true", resources=Resources.parse(1, "64m")))
             for _ in range(3)]
    api.scheduler.place_pending()  # the full pass counts the waiting tasks by reason
    after = _samples(metrics_text())
    queued = ("cloudai_submits_total", (("status", "queued"),))
    pending = ("cloudai_submits_total", (("status", "pending"),))
    assert after[queued] - before.get(queued, 0) == 1 and after[pending] - before.get(pending, 0) == 2
    waiting = [store.get_task(t.task_id) for t in tasks[1:]]
    kinds = Counter(metrics.reason_kind(t.pending_reason) for t in waiting if t is not None)
    assert sum(kinds.values()) == 2
    for kind, count in kinds.items():
        assert after[("cloudai_tasks_waiting", (("reason", kind),))] == count


def metrics_text() -> str:
    from prometheus_client import generate_latest

    return generate_latest().decode()


def test_a_worker_endpoint_counts_log_lines_and_bytes(redis_url: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics.serve(port, "127.0.0.1")
    url = f"http://127.0.0.1:{port}/metrics"
    before = _samples(httpx.get(url, timeout=30).text)
    bus = LogBus(redis.Redis.from_url(redis_url, decode_responses=True), 1000)
    writer = bus.writer("t-metrics")
    writer.add("hello")
    writer.add_many([("a", ""), ("bc", "")])
    writer.flush()
    after = _samples(httpx.get(url, timeout=30).text)
    lines, size = ("cloudai_log_lines_total", ()), ("cloudai_log_bytes_total", ())
    assert after[lines] - before[lines] == 3 and after[size] - before[size] == 8
