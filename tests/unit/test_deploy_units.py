"""deploy/systemd: each unit starts a command the CLI accepts, with the flags it has, and the env file sets only
settings CloudAI reads; where systemd-analyze is installed, the units verify."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cloudai.settings import Settings
from tests.helpers import ROOT, cloudai

UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
BINARY = "/opt/cloudai/venv/bin/cloudai"


def _unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys as systemd spells them
    unit.read(path)
    return unit


def test_there_is_a_unit_for_master_worker_and_beat() -> None:
    assert [p.name for p in UNITS] == ["cloudai-beat.service", "cloudai-master.service", "cloudai-worker.service"]


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_each_unit_runs_a_command_the_cli_accepts(path: Path) -> None:
    exec_start = shlex.split(_unit(path)["Service"]["ExecStart"].replace("%H", "host1"))
    assert exec_start[0] == BINARY
    # click parses every option before an eager --help answers: an unknown flag or command is exit 2
    result = subprocess.run(cloudai(*exec_start[1:], "--help"), capture_output=True, text=True, timeout=60,
                            env={**os.environ, "CLOUDAI_CMDSERVER": "off"}, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_the_env_file_sets_settings_cloudai_reads() -> None:
    lines = (ROOT / "deploy" / "systemd" / "cloudai.env.example").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert set(env) <= {"CLOUDAI_REDIS_URL", "CLOUDAI_STORE_URL", "CLOUDAI_HEARTBEAT_INTERVAL",
                        "CLOUDAI_HEARTBEAT_TIMEOUT"}
    settings = Settings.from_env(env)  # every value is one CloudAI takes
    assert settings.redis_url.startswith("sentinel://") and settings.heartbeat_timeout_s == 30


def test_the_units_verify_where_systemd_analyze_is_installed(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the parse checks above still ran)")
    venv_cloudai = shutil.which("cloudai") or str(Path(sys.executable).parent / "cloudai")
    for path in UNITS:  # the install paths and the service user exist only on a deployed host
        text = path.read_text().replace(BINARY, venv_cloudai).replace("=cloudai\n", "=root\n").replace(
            "/etc/cloudai/cloudai.env", str(ROOT / "deploy" / "systemd" / "cloudai.env.example"))
        (tmp_path / path.name).write_text(text)
    result = subprocess.run([analyze, "verify", *map(str, sorted(tmp_path.glob("*.service")))], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
