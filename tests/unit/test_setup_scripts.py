"""What the README's two commands install on a fresh machine: ``scripts/demo`` and ``scripts/test`` decide it
with ``packages_needed`` in scripts/lib.sh. These run the real scripts with a PATH that lacks the tools, so a
script that stops passing its mode (the bug of `VAR=1 source lib.sh`) fails here, not on a newcomer's machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

BASE = ["redis-server", "docker.io", "busybox-static", "python3-venv", "git"]
TEST_TOOLS = ["chromium", "chromium-driver", "docker-compose"]


def _bin(tmp_path: Path, *tools: str) -> Path:
    """A PATH folder with the coreutils the scripts use to start, plus stubs named ``tools``."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name in ("dirname", "mkdir"):
        real = shutil.which(name)
        assert real, name
        (folder / name).symlink_to(real)
    for name in tools:
        stub = folder / name
        stub.write_text("#!/bin/sh\nexit 1\n" if name == "ldd" else "#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    return folder


def _plan(script: str, path: Path, busybox: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(path), "HOME": os.environ.get("HOME", "/root"), "CLOUDAI_SETUP_PLAN": "1",
           "CLOUDAI_BUSYBOX": str(busybox or path / "no-busybox")}
    return subprocess.run(["/bin/bash", str(ROOT / "scripts" / script)], env=env, capture_output=True, text=True,
                          timeout=30, cwd=ROOT)


@pytest.mark.parametrize(("script", "expected"), [("test", BASE + TEST_TOOLS), ("demo", BASE), ("bench", BASE)])
def test_a_fresh_machine_gets_every_package_its_command_needs(tmp_path: Path, script: str,
                                                               expected: list[str]) -> None:
    result = _plan(script, _bin(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == expected


def test_nothing_is_installed_when_everything_is_there(tmp_path: Path) -> None:
    tools = ["redis-server", "dockerd", "docker", "git", "chromium", "chromedriver", "docker-compose", "ldd"]
    folder = _bin(tmp_path, *tools)
    (folder / "python3").symlink_to(sys.executable)  # has venv and ensurepip
    busybox = folder / "busybox"
    busybox.write_text("#!/bin/sh\n")
    busybox.chmod(0o755)
    for script in ("test", "demo"):
        result = _plan(script, folder, busybox)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [], script


def test_a_dynamically_linked_busybox_is_not_enough(tmp_path: Path) -> None:
    folder = _bin(tmp_path, "redis-server", "dockerd", "docker", "git")
    (folder / "ldd").write_text("#!/bin/sh\necho 'libc.so.6 => /lib/libc.so.6'\n")  # ldd succeeds: dynamic
    (folder / "ldd").chmod(0o755)
    (folder / "python3").symlink_to(sys.executable)
    busybox = folder / "busybox"
    busybox.write_text("#!/bin/sh\n")
    busybox.chmod(0o755)
    result = _plan("demo", folder, busybox)
    assert result.stdout.split() == ["busybox-static"], result.stderr


def test_a_missing_mode_is_an_error_not_a_silent_default(tmp_path: Path) -> None:
    script = tmp_path / "bad"
    script.write_text(f'source "{ROOT}/scripts/lib.sh"\nsetup_all\n')
    env = {"PATH": str(_bin(tmp_path)), "CLOUDAI_SETUP_PLAN": "1"}
    result = subprocess.run(["/bin/bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "mode must be demo or test" in result.stderr
