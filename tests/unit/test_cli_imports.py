"""`cloudai --help` loads the command definitions only; each command imports what it uses when it runs."""

from __future__ import annotations

import json
import subprocess
import sys

from cli.main import STATUSES
from cloudai.models import TaskStatus

HEAVY = ("cloudai.models", "cloudai.api", "cloudai.celery_app", "redis", "rich", "docker", "httpx", "celery")


def _modules_after(*argv: str) -> set[str]:
    code = ("import json, sys\nfrom cli.main import cli\ntry:\n"
            f"    cli.main(args={list(argv)!r}, prog_name='cloudai')\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(sys.modules)), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stderr.strip().splitlines()[-1]))


def test_help_imports_nothing_heavy() -> None:
    for argv in (["--help"], ["submit", "--help"], ["list", "--help"]):
        loaded = _modules_after(*argv)
        assert not [m for m in HEAVY if m in loaded], argv


def test_list_status_choices_are_the_task_statuses() -> None:
    assert tuple(s.value for s in TaskStatus) == STATUSES
