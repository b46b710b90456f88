"""Lists at 100,000 tasks on the SQLite store: a page is read from an index (keyset on (created_at, task_id)),
never by loading the history; beat's maintenance queries walk the status index, not the history."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from click.testing import CliRunner

from cloudai.cli.main import cli
from cloudai.models import LIVE, Task, TaskStatus, utcnow
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import cli_env

S = TaskStatus
N = 100_000
FINISHED = (S.COMPLETED, S.FAILED, S.CANCELLED)


@pytest.fixture
def history(store: SQLiteStore) -> list[str]:
    """100,000 task records of two users (most finished, a few live), one a millisecond apart: their ids,
    oldest first."""
    start = utcnow() - timedelta(seconds=N / 1000 + 60)
    ids = [f"h{i:07d}" for i in range(N)]
    tasks = (Task(task_id=task_id, user_id="tester" if i % 2 else "other", docker_image="busybox",
                  command="true", memory_bytes=64 << 20,
                  status=S.PENDING if i % 1000 == 0 else FINISHED[i % 3],
                  created_at=start + timedelta(milliseconds=i))
             for i, task_id in enumerate(ids))
    assert store.import_tasks(tasks) == N
    return ids


def test_list_returns_the_newest_page_from_an_index(settings: Settings, store: SQLiteStore,
                                                   history: list[str]) -> None:
    env = cli_env(settings)
    got = CliRunner().invoke(cli, ["list", "--user", "all", "--limit", "100", "--json"], env=env)
    assert got.exit_code == 0, got.output
    assert [t["task_id"] for t in json.loads(got.output)] == history[::-1][:100]
    page2 = CliRunner().invoke(cli, ["list", "--user", "all", "--limit", "100", "--before", history[-100],
                                     "--json"], env=env)
    assert page2.exit_code == 0, page2.output
    assert [t["task_id"] for t in json.loads(page2.output)] == history[::-1][100:200]
    cursor = store.get_task(history[-100])
    assert cursor is not None
    for filters in ({}, {"user_id": "tester"}, {"before": (cursor.created_at, cursor.task_id)},
                    {"user_id": "tester", "before": (cursor.created_at, cursor.task_id)}):
        plan = " | ".join(store.list_plan(limit=100, **filters))  # type: ignore[arg-type]
        assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, (filters, plan)
        assert "TEMP B-TREE" not in plan, (filters, plan)  # the index gives the order: no sort of the history


def test_a_users_pages_walk_the_whole_history_in_order(store: SQLiteStore, history: list[str]) -> None:
    mine = [t for i, t in enumerate(history) if i % 2][::-1]
    seen: list[str] = []
    before = None
    while len(seen) < 1000:
        page = store.list_tasks(user_id="tester", limit=250, before=before)
        seen += [t.task_id for t in page]
        before = (page[-1].created_at, page[-1].task_id)
    assert seen == mine[:1000]


def test_beats_queries_read_live_and_waiting_tasks_by_their_status(store: SQLiteStore,
                                                                   history: list[str]) -> None:
    # the reaper and reconcile (live), the resend job (queued), and placement passes (pending)
    for status in (LIVE, [S.QUEUED], [S.PENDING]):
        plan = " | ".join(store.list_plan(status=status, limit=None))
        assert "tasks_status" in plan and "SCAN tasks" not in plan.replace("USING INDEX", ""), plan
    assert len(store.list_tasks(status=[S.PENDING], limit=None)) == N // 1000
