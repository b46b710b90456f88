"""The report of issue 15 as a user hits it, with real processes: a task whose name and command hold rich markup
and terminal escapes is recorded, and `cloudai list` / `status` show them literally instead of crashing."""

from __future__ import annotations

from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.e2e.conftest import run, submit
from tests.helpers import register
from tests.services import TEST_IMAGE


def test_markup_and_escapes_show_literally(settings: Settings, store: SQLiteStore) -> None:
    register(store, settings.worker_id)  # the task is queued there; no worker needs to run it
    task_id = submit(settings, "--name", "[/]oops", "--shell", TEST_IMAGE, "echo '[/]' \x1b[2J\x1b]0;pwned\x07 [bold]x")
    listed = run(settings, "list")
    assert listed.returncode == 0, listed.stderr
    assert "MarkupError" not in listed.stderr and "\x1b" not in listed.stdout
    assert "echo '[/]' \\x1b[2J\\x1b]0;pwned\\x07 [bold]x" in listed.stdout
    status = run(settings, "status", task_id)
    assert status.returncode == 0 and "[/]oops" in status.stdout and "\x1b" not in status.stdout
    assert [t.task_id for t in store.list_tasks(limit=None)] == [task_id]
