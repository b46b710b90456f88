"""User-supplied strings show literally on a terminal: no rich markup, no control sequences (issue 15)."""

from __future__ import annotations

import io
from pathlib import Path

from click.testing import CliRunner
from rich.console import Console

from cloudai.cli import render
from cloudai.cli.main import cli
from cloudai.logs import LogEnd
from cloudai.models import Task, TaskError, TaskStatus
from cloudai.store.sqlite import SQLiteStore

HOSTILE = "[/] [bold red]x[/bold red] \x1b[2J\x1b]0;title\x07 \r\x9b \u202eevil \udcff end"


def _hostile_task() -> Task:
    return Task(task_id="t1", user_id="[/]mallory\x1b[31m", docker_image="busybox", command=HOSTILE,
                name="[/]name\x1b[1m", labels={"k": "[/]"}, status=TaskStatus.FAILED, exit_code=3,
                error=TaskError("NonZeroExit", "cancelled by [/]\x1b[0m"))


def _render(renderable: object) -> str:
    out = io.StringIO()
    Console(file=out, width=400, highlight=False, force_terminal=False).print(renderable)
    return out.getvalue()


def test_visible_shows_controls_as_escapes() -> None:
    assert render.visible("a\x1b[31mb\rc\x00d\x9be\u202ef\udcffg\nh\ti") == (
        "a\\x1b[31mb\\rc\\x00d\\x9be\\u202ef\\udcffg\\nh\\ti")
    assert render.visible("line1\nline2\tx\x1b", keep_lines=True) == "line1\nline2\tx\\x1b"
    assert render.visible("plain ü 中 ✓") == "plain ü 中 ✓"


def test_task_table_shows_markup_and_escapes_literally() -> None:
    text = _render(render.task_table([_hostile_task()]))
    assert "[/]mallory\\x1b[31m" in text
    assert "[/] [bold red]x[/bold red] \\x1b[2J\\x1b]0;title\\x07" in text
    assert "\x1b" not in text and "\r" not in text and "\x9b" not in text and "\u202e" not in text


def test_status_block_and_final_block_are_escaped() -> None:
    out = io.StringIO()
    render.print_status(_hostile_task(), out)
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
    assert "[/]mallory\\x1b[31m" in text and "\\udcff" in text
    block = render.final_block(LogEnd("cancelled", None, "cancelled by [/]\x1b[2J"), color=False)
    assert block == "Task Cancelled — cancelled by [/]\\x1b[2J"


def test_list_does_not_crash_on_markup(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "s.db"))
    store.create_task(_hostile_task())
    env = {"CLOUDAI_STORE_URL": f"sqlite:///{tmp_path}/s.db", "CLOUDAI_REDIS_URL": "redis://127.0.0.1:9/0"}
    result = CliRunner().invoke(cli, ["list", "--user", "all"], env=env)
    assert result.exit_code == 0, result.output
    assert "[/]mallory\\x1b[31m" in result.output and "\x1b" not in result.output
    status = CliRunner().invoke(cli, ["status", "t1"], env=env)
    assert status.exit_code == 0 and "\x1b" not in status.output and "[/]name\\x1b[1m" in status.output


def test_error_messages_are_escaped(tmp_path: Path) -> None:
    env = {"CLOUDAI_STORE_URL": f"sqlite:///{tmp_path}/s.db", "CLOUDAI_REDIS_URL": "redis://127.0.0.1:9/0"}
    result = CliRunner().invoke(cli, ["status", "x\x1b[2Jy"], env=env)
    assert result.exit_code == 122 and "\x1b" not in result.output and "x\\x1b[2Jy" in result.output
