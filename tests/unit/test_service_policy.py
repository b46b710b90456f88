"""A test that needs a service fails under CI when the service is missing, and is skipped (with the reason)
elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

TARGET = "tests/integration/test_maintenance.py::test_only_one_beat_acts"


def _run(**env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "CLOUDAI_REQUIRE_SERVICES")}
    base.update(env, CLOUDAI_REDIS_URL="redis://127.0.0.1:9/0", CLOUDAI_SERVICE_WAIT="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", TARGET],
                          cwd=ROOT, env=base, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("env", [{"CI": "true"}, {"CLOUDAI_REQUIRE_SERVICES": "1"}])
def test_missing_redis_fails_under_ci(env: dict[str, str]) -> None:
    result = _run(**env)
    assert result.returncode == 1, result.stdout
    assert "1 error" in result.stdout or "1 failed" in result.stdout
    assert "does not answer" in result.stdout


def test_missing_redis_skips_outside_ci() -> None:
    result = _run()
    assert result.returncode == 0 and "1 skipped" in result.stdout and "does not answer" in result.stdout
