"""What the README's two commands install on a fresh machine: ``scripts/demo`` and ``scripts/test`` decide it
with ``packages_needed`` in scripts/lib.sh. These run the real scripts with a PATH that lacks the tools, so a
script that stops passing its mode (the bug of `VAR=1 source lib.sh`) fails here, not on a newcomer's machine."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

BASE = ["redis-server", "docker.io", "busybox-static", "python3-venv", "git"]
CLUSTER_TOOLS = ["redis-sentinel", "iproute2", "iptables"]
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


@pytest.mark.parametrize(("script", "expected"), [("test", BASE + CLUSTER_TOOLS + TEST_TOOLS), ("demo", BASE),
                                                  ("bench", BASE), ("cluster", BASE + CLUSTER_TOOLS)])
def test_a_fresh_machine_gets_every_package_its_command_needs(tmp_path: Path, script: str,
                                                               expected: list[str]) -> None:
    result = _plan(script, _bin(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == expected


def test_nothing_is_installed_when_everything_is_there(tmp_path: Path) -> None:
    tools = ["redis-server", "dockerd", "docker", "git", "chromium", "chromedriver", "docker-compose", "ldd",
             "redis-sentinel", "ip", "iptables"]
    folder = _bin(tmp_path, *tools)
    (folder / "python3").symlink_to(sys.executable)  # has venv and ensurepip
    busybox = folder / "busybox"
    busybox.write_text("#!/bin/sh\n")
    busybox.chmod(0o755)
    for script in ("test", "demo", "cluster"):
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
    assert result.returncode == 2 and "mode must be demo, cluster or test" in result.stderr


def _demo_in(tmp_path: Path) -> Path:
    """scripts/demo and lib.sh in a folder of their own: its .cache/run is not this worktree's (a demo may run)."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("demo", "lib.sh"):
        shutil.copy2(ROOT / "scripts" / name, root / "scripts" / name)
    return root


def _demo(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/bash", str(root / "scripts" / "demo"), *args], capture_output=True, text=True,
                          timeout=60, cwd=root)


def test_demo_stop_stops_what_it_recorded_and_not_a_pid_that_another_program_reuses(tmp_path: Path) -> None:
    root = _demo_in(tmp_path)
    sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
    server = subprocess.Popen([*sleep, "cloudai", "server"], start_new_session=True)  # as `setsid cloudai server`
    stranger = subprocess.Popen(sleep, start_new_session=True)  # the recorded worker's pid, now another program's
    try:
        (root / ".cache" / "run").mkdir(parents=True)
        pids = root / ".cache" / "run" / "demo.pids"
        pids.write_text(f"worker {stranger.pid}\nserver {server.pid}\n")
        status = _demo(root, "status")
        assert status.returncode == 0, status.stderr
        assert status.stdout.splitlines() == [f"worker: not running (was pid {stranger.pid})",
                                              f"server: running (pid {server.pid})"]
        stopped = _demo(root, "stop")
        assert stopped.returncode == 0, stopped.stderr
        assert server.wait(30) == -signal.SIGTERM
        assert stranger.poll() is None and not pids.exists()
        assert _demo(root, "status").stdout.startswith("no demo runs")
    finally:
        for proc in (server, stranger):
            proc.kill()
            proc.wait(10)


def test_demo_refuses_an_unknown_command(tmp_path: Path) -> None:
    result = _demo(_demo_in(tmp_path), "restart")
    assert result.returncode == 1 and "usage: ./scripts/demo [start|status|stop]" in result.stderr
