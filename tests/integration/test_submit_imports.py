"""What a command loads before it does its work: each `cloudai` process pays for every module it imports, and a
submit's imports are on the path between the user's Enter and the container's start (``-X importtime`` lists
every import a process makes)."""

from __future__ import annotations

import subprocess

from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import ROOT, ServerProc, cloudai, register

# what following a log needs, and what only a worker's start does (the GPU inventory runs nvidia-smi)
FOLLOW_ONLY = ("cloudai.cli.follow", "cloudai.logfollow", "cloudai.logs", "subprocess")


def _imports(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    result = subprocess.run(cloudai(*args), cwd=ROOT, env={**env, "PYTHONPROFILEIMPORTTIME": "1"},
                            capture_output=True, text=True, timeout=60)
    return result, {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                    if line.startswith("import time:")}


def test_a_quiet_submit_loads_no_log_following_code(settings: Settings, store: SQLiteStore,
                                                     api_server: ServerProc) -> None:
    register(store, "w-imports")
    env = api_server.cli_env(api_server.token(settings.user))
    result, imported = _imports(env, "submit", "-q", "busybox", "--", "true")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cloudai.cli.remote" in imported and "httpx" in imported  # the list is complete
    assert not sorted(m for m in imported if m in FOLLOW_ONLY)
    # a user's CLI places nothing and talks to no cluster service: the master does
    assert not sorted(m for m in imported if m.split(".")[0] in ("redis", "celery", "kombu", "docker", "pymongo")
                      or m in ("cloudai.scheduler", "cloudai.api", "cloudai.store.sqlite"))
