"""The queue message: one frozen, versioned dataclass; anything else is refused clearly."""

from __future__ import annotations

import dataclasses

import pytest

from cloudai.fencing import Fence, fence_after, redis_timeout
from cloudai.logevents import LogLine, attempt_marker, attempt_section
from cloudai.message import WIRE_VERSION, MessageError, RunMessage
from cloudai.models import Task, new_execution_id


def _task() -> Task:
    return Task(task_id="t1", user_id="ana", docker_image="busybox", command="echo hi", worker_id="w1",
                gpu_ids=["0", "1"], attempt=2, execution_id=new_execution_id(2))


def test_round_trip_carries_the_attempt_identity() -> None:
    task = _task()
    wire = RunMessage.from_task(task).to_wire()
    assert wire["version"] == WIRE_VERSION and wire["execution_id"] == task.execution_id
    parsed = RunMessage.from_wire(wire)
    assert parsed == RunMessage.from_task(task) and parsed.attempt == 2 and parsed.gpu_ids == ("0", "1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.attempt = 3  # type: ignore[misc]


@pytest.mark.parametrize("wire, words", [
    ({"task_id": "t1"}, "version None is not understood"),
    ({**RunMessage.from_task(_task()).to_wire(), "version": 99}, "version 99 is not understood"),
    ({**RunMessage.from_task(_task()).to_wire(), "execution_id": ""}, "lacks execution_id"),
    ({**RunMessage.from_task(_task()).to_wire(), "surprise": 1}, "unknown fields surprise"),
    ("t1", "JSON object"),
])
def test_unknown_versions_and_shapes_are_refused_clearly(wire: object, words: str) -> None:
    with pytest.raises(MessageError, match=words):
        RunMessage.from_wire(wire)


def test_execution_ids_sort_by_attempt() -> None:
    assert new_execution_id(2) > new_execution_id(1) and new_execution_id(10) > new_execution_id(9)


def test_attempt_sections_split_at_markers_written_by_cloudai_only() -> None:
    events = [LogLine(1, "a", "t"), LogLine(2, "[cloudai] attempt 2 started", "t"),  # printed by the task
              LogLine(3, "[cloudai] lost; retrying", ""), LogLine(4, "[cloudai] attempt 2 started on worker w", ""),
              LogLine(5, "b", "t")]
    assert attempt_marker("[cloudai] attempt 2 started", "t") is None
    assert [e.seq for e in attempt_section(events, 1)] == [1, 2, 3]
    assert [e.seq for e in attempt_section(events, 2)] == [4, 5]


def test_the_fence_limit_leaves_a_margin_before_the_heartbeat_timeout() -> None:
    assert fence_after(30, 5) == 22.5 and fence_after(4, 0.5) == 3.0
    # a worker's Redis calls wait at most a quarter of that margin (a partition must not hold a fence up)
    assert redis_timeout(30, 5) == 1.875 and redis_timeout(4, 0.5) == 0.5 and redis_timeout(3600, 5) == 30
    fence = Fence(limit_s=10)
    assert fence.healthy() and not fence.heartbeat_ok()
