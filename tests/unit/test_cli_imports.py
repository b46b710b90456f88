"""`cloudai --help` loads the command definitions only; each command imports what it uses when it runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from cloudai.cli.main import STATUSES
from cloudai.models import TaskStatus

HEAVY = ("cloudai.models", "cloudai.api", "cloudai.celery_app", "redis", "rich", "docker", "httpx", "celery")


def _modules_after(*argv: str, env: dict[str, str] | None = None) -> set[str]:
    code = ("import json, sys\nfrom cloudai.cli.main import cli\ntry:\n"
            f"    cli.main(args={list(argv)!r}, prog_name='cloudai')\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(sys.modules)), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    return set(json.loads(out.stderr.strip().splitlines()[-1]))


def test_help_imports_nothing_heavy() -> None:
    for argv in (["--help"], ["submit", "--help"], ["list", "--help"]):
        loaded = _modules_after(*argv)
        assert not [m for m in HEAVY if m in loaded], argv


def test_a_command_through_the_master_imports_neither_redis_nor_httpxs_own_cli(tmp_path: object) -> None:
    with socket.socket() as sock:  # a port nothing listens on: the command fails to connect, as it may
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    loaded = _modules_after("status", "abc123", env={"CLOUDAI_API_URL": url, "CLOUDAI_TOKEN": "x" * 40,
                                                      "XDG_CONFIG_HOME": str(tmp_path)})
    assert "httpx" in loaded and "cloudai.cli.remote" in loaded  # it did go through the API client
    # httpx's command-line tool (rich.progress, pygments) and everything of direct mode stay unloaded
    assert not [m for m in ("redis", "celery", "docker", "pygments", "rich.progress", "rich.syntax", "attr")
                if m in loaded]
    assert not [m for m in loaded if m.startswith("trio.")]  # httpcore's optional trio support stays unloaded


def test_list_status_choices_are_the_task_statuses() -> None:
    assert tuple(s.value for s in TaskStatus) == STATUSES
