"""A client-only install (`pip install cloudai`, no extra) as a user gets it: a fresh virtualenv, the lock
requirements/client.txt (hashes checked, nothing else resolved) and a non-editable install of this tree. The
CLI works, and nothing of the cluster's side (Celery, Redis, Docker, MongoDB clients) came with it.

Needs the package index pip is configured with (or the network) for the locked wheels."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

#: what the worker and server extras bring; a client install must not have them
SERVER_SIDE = ("celery", "redis", "docker", "pymongo")
#: the design card's top-level folders, installed only inside the cloudai package
CARD_FOLDERS = ("cli", "workers", "beat")
#: left out of the copy that is built: build outputs and caches of this worktree
NOT_SOURCES = (".git", ".venv", ".cache", "build", "*.egg-info", "__pycache__", ".mypy_cache", ".ruff_cache",
               ".pytest_cache")


def _not_sources(folder: str, names: list[str]) -> set[str]:
    """:data:`NOT_SOURCES`, and the tree's own ``artifacts/`` (test screenshots; not the package cloudai/artifacts)."""
    left_out = set(shutil.ignore_patterns(*NOT_SOURCES)(folder, names))
    if Path(folder) == ROOT and "artifacts" in names:
        left_out.add("artifacts")
    return left_out


def _run(*args: str | Path, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A virtualenv with requirements/client.txt and this tree (a copy of it: the build writes build/ and
    *.egg-info beside the sources) installed as a wheel is; its environment has no CLOUDAI_ or PYTHON variable."""
    base = tmp_path_factory.mktemp("client-install")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDAI_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(base), XDG_CONFIG_HOME=str(base / "config"), PIP_DISABLE_PIP_VERSION_CHECK="1",
               CLOUDAI_CMDSERVER="off")  # no background command server outlives the test
    venv = base / "venv"
    made = _run(sys.executable, "-m", "venv", venv, env=env, cwd=base)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    locked = _run(python, "-m", "pip", "install", "-q", "--no-deps", "--require-hashes", "-r",
                  ROOT / "requirements" / "client.txt", env=env, cwd=base)
    assert locked.returncode == 0, locked.stderr[-3000:]
    sources = base / "src"
    shutil.copytree(ROOT, sources, symlinks=True, ignore=_not_sources)
    built = _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", ".", env=env,
                 cwd=sources)
    assert built.returncode == 0, built.stderr[-3000:]
    return venv, env


def _site_packages(venv: Path, env: dict[str, str]) -> Path:
    where = _run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                 env=env, cwd=venv)
    assert where.returncode == 0, where.stderr
    return Path(where.stdout.strip())


def test_the_card_folders_are_installed_only_inside_cloudai(client_venv: tuple[Path, dict[str, str]]) -> None:
    site = _site_packages(*client_venv)
    assert (site / "cloudai" / "__init__.py").is_file()
    assert not [name for name in CARD_FOLDERS if (site / name).exists()], sorted(p.name for p in site.iterdir())
    for name in CARD_FOLDERS:
        assert (site / "cloudai" / name / "__init__.py").is_file(), f"cloudai/{name} is not installed"
    assert (site / "cloudai" / "web" / "templates").is_dir()  # package data came with it


def test_the_cli_runs(client_venv: tuple[Path, dict[str, str]]) -> None:
    venv, env = client_venv
    helped = _run(venv / "bin" / "cloudai", "--help", env=env, cwd=venv.parent, timeout=60)
    assert helped.returncode == 0, helped.stderr
    assert "submit" in helped.stdout and "Traceback" not in helped.stderr


def test_a_user_command_reaches_for_the_master_not_for_a_missing_module(
        client_venv: tuple[Path, dict[str, str]]) -> None:
    """Through the API (nothing listens on the port): the error is the unreachable master, not an import."""
    venv, env = client_venv
    user = {**env, "CLOUDAI_API_URL": "http://127.0.0.1:9", "CLOUDAI_TOKEN": "not-a-token"}
    for command in (["list"], ["whoami"], ["submit", "busybox", "true"], ["logs", "t1"], ["workers"]):
        got = _run(venv / "bin" / "cloudai", *command, env=user, cwd=venv.parent, timeout=60)
        assert got.returncode != 0 and "127.0.0.1:9" in got.stderr, (command, got.stderr)
        assert "Traceback" not in got.stderr and "No module named" not in got.stderr, (command, got.stderr)


@pytest.mark.parametrize("module", SERVER_SIDE)
def test_the_server_side_libraries_are_not_installed(client_venv: tuple[Path, dict[str, str]], module: str) -> None:
    venv, env = client_venv
    got = _run(venv / "bin" / "python", "-c", f"import {module}", env=env, cwd=venv.parent, timeout=60)
    assert got.returncode != 0 and f"No module named '{module}'" in got.stderr, got.stderr
