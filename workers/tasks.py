"""``cloudai.run_container``: the one task a worker runs. The spec travels in full in the message."""

from __future__ import annotations

from typing import Any

from cloudai import keys
from cloudai.celery_app import app
from workers import bootstrap


@app.task(name=keys.RUN_CONTAINER_TASK, acks_late=False)
def run_container(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the task ``spec["task_id"]`` in a container on this worker; returns its final status."""
    status = bootstrap.current().executor.run(spec)  # parses and checks the RunMessage (its only wire format)
    return {"task_id": spec.get("task_id") if isinstance(spec, dict) else None, "status": status}
