"""`cloudai monitor`'s ending when the user presses a key: a branch that real services reach only by the timing of
a key press, so a stub client drives it (the e2e tests run monitor on real services)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from cloudai.cli import follow
from cloudai.logevents import LineBatch, LogEnd, LogEvent
from cloudai.models import Task, TaskError, TaskStatus


class PressedKeys:
    """KeyWatcher's stand-in: no terminal; ``pressed`` is set by the client below."""

    pressed = threading.Event()

    def __enter__(self) -> PressedKeys:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class ArchivedTask:
    """A task that ended long ago: its archive comes as a batch of lines, then its end marker; the key is pressed
    while the lines print."""

    def __init__(self, status: TaskStatus) -> None:
        self.task = Task(task_id="t1", user_id="u", docker_image="img", command="true", status=status,
                         exit_code=3 if status == TaskStatus.FAILED else None,
                         error=TaskError("ExitCode", "exit 3") if status == TaskStatus.FAILED else None)

    def get(self, task_id: str) -> Task:
        return self.task

    def follow_batches(self, task_id: str, after_seq: int = 0, **kwargs: Any) -> Iterator[Sequence[LogEvent]]:
        PressedKeys.pressed.set()  # while the lines print
        yield LineBatch(1, ["one", "two"], ["", ""])
        if self.task.status.terminal:
            yield [LogEnd.of_task(self.task)]


@pytest.fixture(autouse=True)
def keys_pressed_mid_log(monkeypatch: pytest.MonkeyPatch) -> None:
    PressedKeys.pressed.clear()
    monkeypatch.setattr(follow, "_interactive", lambda: True)
    monkeypatch.setattr(follow, "KeyWatcher", PressedKeys)
    monkeypatch.setattr(follow.click, "clear", lambda: None)


def test_a_key_between_an_ended_tasks_last_lines_and_its_end_still_shows_the_end(
        capsys: pytest.CaptureFixture[str]) -> None:
    code = follow.monitor(ArchivedTask(TaskStatus.FAILED), "t1", header=False)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert code == 3 and "one\ntwo\n" in out and "Task Failed" in out and "keeps running" not in out


def test_a_key_while_a_task_runs_stops_watching_and_says_it_keeps_running(
        capsys: pytest.CaptureFixture[str]) -> None:
    code = follow.monitor(ArchivedTask(TaskStatus.RUNNING), "t1", header=False)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert code == 0 and "keeps running" in out and "Task Failed" not in out
