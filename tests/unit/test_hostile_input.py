"""Hostile input (issue 15): each value gets a clear usage error (exit 2, naming the field and the bound) and
nothing is recorded, or a safe outcome. The CLI gets invalid UTF-8 as surrogate-escaped argv, which is what
CliRunner passes here too."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cloudai import limits
from cloudai.api import SubmitRequest, parse_key_values
from cloudai.cli.main import cli
from cloudai.errors import ValidationError
from cloudai.store.sqlite import SQLiteStore

BAD_UTF8 = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of Latin-1 bytes in argv
MB = 1024 * 1024


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    # Redis on a port where nothing listens: validation errors must come before any connection
    return {"CLOUDAI_STORE_URL": f"sqlite:///{tmp_path}/s.db", "CLOUDAI_REDIS_URL": "redis://127.0.0.1:9/0",
            "CLOUDAI_USER": "ana"}


def _submit(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["submit", *args], env=env)
    return result.exit_code, result.output


def _nothing_recorded(tmp_path: Path) -> None:
    assert SQLiteStore(f"{tmp_path}/s.db").list_tasks(limit=None) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # sizes of things
        (["busybox", "x" * (10 * MB)], "invalid command 'xxxx"),
        (["busybox", "x" * (10 * MB)], "the most is 128 KiB"),
        (["-e", "A=" + "v" * MB, "busybox"], "invalid env A"),
        (["-e", "A=" + "v" * MB, "busybox"], "the most is 32 KiB"),
        (["--name", "n" * 300, "busybox"], "the most is 200"),
        (["-l", "k=" + "v" * 2000, "busybox"], "the most is 1024"),
        # NUL bytes and invalid UTF-8 in every text field
        (["busybox", "echo a\x00b"], "NUL byte"),
        (["-e", "A=a\x00b", "busybox"], "NUL byte"),
        (["--name", "a\x00", "busybox"], "NUL byte"),
        (["busybox", "echo " + BAD_UTF8], "not valid UTF-8"),
        (["busybox" + BAD_UTF8], "invalid image"),
        (["--name", BAD_UTF8, "busybox"], "not valid UTF-8"),
        (["-e", "A=" + BAD_UTF8, "busybox"], "not valid UTF-8"),
        (["-e", BAD_UTF8 + "=1", "busybox"], "not valid UTF-8"),
        (["-l", "k=" + BAD_UTF8, "busybox"], "not valid UTF-8"),
        (["-l", BAD_UTF8 + "=v", "busybox"], "not valid UTF-8"),
        (["--constraint", "gpu=" + BAD_UTF8, "busybox"], "not valid UTF-8"),
        (["-w", "/" + BAD_UTF8, "busybox"], "not valid UTF-8"),
        (["--as-user", BAD_UTF8, "busybox"], "not valid UTF-8"),
        (["--worker", BAD_UTF8, "busybox"], "not valid UTF-8"),
        # control characters in one-line fields (the command and env values may hold any but NUL)
        (["--name", "a\x1b[2Jb", "busybox"], "control characters"),
        (["-l", "k=a\x1b[31m", "busybox"], "control characters"),
        (["--as-user", "a\x1b[31m", "busybox"], "invalid user"),
        (["--as-user", "[/]x", "busybox"], "invalid user '[/]x'"),
        # worker ids: a documented charset and length
        (["--worker", "../etc", "busybox"], "invalid worker '../etc'"),
        (["--worker", "a b", "busybox"], "invalid worker 'a b'"),
        (["--worker", "*", "busybox"], "letters, digits"),
        (["--worker", "w" * 300, "busybox"], "up to 128"),
        # resources
        (["--cpus", "-1", "busybox"], "invalid cpus '-1'"),
        (["--cpus", "nan", "busybox"], "at most 1024"),
        (["--cpus", "inf", "busybox"], "at most 1024"),
        (["--cpus", "1e309", "busybox"], "invalid cpus '1e309'"),
        (["-m", "-4g", "busybox"], "invalid memory '-4g'"),
        (["-m", "nan", "busybox"], "invalid memory 'nan'"),
        (["-m", "1e309", "busybox"], "invalid memory"),
        (["-m", "9" * 400, "busybox"], "at most 64t"),
        (["-m", "65t", "busybox"], "at most 64t"),
        (["--gpus", "-1", "busybox"], "whole number of GPUs from 0 to 64"),
        (["--gpus", "nan", "busybox"], "whole number of GPUs"),
        (["--gpus", "1e309", "busybox"], "whole number of GPUs"),
        (["--storage", "-1g", "busybox"], "invalid storage"),
        # durations
        (["--timeout", "-5m", "busybox"], "invalid timeout '-5m'"),
        (["--timeout", "1e9h", "busybox"], "invalid timeout '1e9h'"),
        (["--timeout", "1000000000h", "busybox"], "366d"),
        (["--timeout", "nan", "busybox"], "invalid timeout"),
        (["--timeout", "inf", "busybox"], "invalid timeout"),
        (["--priority", str(10**30), "busybox"], "invalid priority"),
        # images
        (["bus box"], "invalid image 'bus box'"),
        (["BusyBox"], "lower case"),
        (["Team/app"], "lower case"),
        (["busybox@sha256:abc"], "invalid image"),
        (["busybox@sha256:" + "A" * 64], "64 lower-case hex digits"),
        (["busybox:" + "t" * 200], "invalid image"),
        (["-busybox"], "No such option"),
        (["http://evil/x"], "invalid image"),
        # what CloudAI sets itself
        (["-e", "NVIDIA_VISIBLE_DEVICES=all", "busybox"], "invalid env 'NVIDIA_VISIBLE_DEVICES'"),
        (["-l", "cloudai.task_id=other", "busybox"], "CloudAI's own"),
    ],
)
def test_hostile_submit_values_are_usage_errors(env: dict[str, str], tmp_path: Path, args: list[str],
                                                 message: str) -> None:
    code, output = _submit(env, *args)
    assert code == 2, output[:500]
    assert message in output, output[:500]
    assert len(output) < 2000  # a 10 MB value is not echoed back
    _nothing_recorded(tmp_path)


def test_ten_thousand_env_entries(env: dict[str, str], tmp_path: Path) -> None:
    args = [f"--env=K{i}=v" for i in range(10_000)]
    code, output = _submit(env, *args, "busybox")
    assert code == 2 and "invalid env '10000 variables': the most is 1000" in output
    _nothing_recorded(tmp_path)


def test_env_file_with_invalid_utf8_or_nul(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.env"
    bad.write_bytes(b"A=caf\xe9\n")
    code, output = _submit(env, "--env-file", str(bad), "busybox")
    assert code == 2 and "is not UTF-8 text" in output
    bad.write_bytes(b"A=a\x00b\n")
    code, output = _submit(env, "--env-file", str(bad), "busybox")
    assert code == 2 and "NUL byte" in output
    _nothing_recorded(tmp_path)


def test_worker_start_id_is_checked(env: dict[str, str]) -> None:
    for bad in ("../x", "a b", "*", "w" * 300, "x" + BAD_UTF8):
        result = CliRunner().invoke(cli, ["worker", "start", "--id", bad, "--gpus", "none"], env=env)
        assert result.exit_code == 2 and "--id" in result.output and "letters, digits" in result.output \
            or "UTF-8" in result.output, result.output


@pytest.mark.parametrize("task_id", ["../x", "*", "x" * 300, BAD_UTF8, "a\x00b"])
def test_hostile_task_ids_are_simply_unknown(env: dict[str, str], task_id: str) -> None:
    for command in (["status", task_id], ["logs", task_id], ["monitor", task_id]):  # (cancel: the master's 404)
        result = CliRunner().invoke(cli, command, env=env)
        assert result.exit_code == 122, (command, result.output)
        assert "no task" in result.output and "\x00" not in result.output


def test_list_filters_with_invalid_utf8(env: dict[str, str]) -> None:
    result = CliRunner().invoke(cli, ["list", "--user", BAD_UTF8], env=env)
    assert result.exit_code == 2 and "not valid UTF-8" in result.output


def test_markup_in_command_and_name_is_accepted_and_kept(env: dict[str, str]) -> None:
    # the safe outcome: these are ordinary text; the CLI shows them literally (test_render_escaping)
    request = SubmitRequest(image="busybox", command="echo '[/]' $'\\e[31m' \x1b[0m", name="[bold]x[/]",
                            labels={"note": "[/]"})
    request.validate()


def test_valid_references_are_accepted() -> None:
    for ref in ("busybox", "busybox:1.36", "cloudai/busybox:local", "ghcr.io/org/app:1.2", "localhost:5000/a/b_c",
                "REGISTRY.example.com/team/app", "busybox@sha256:" + "a" * 64,
                "busybox:1.36@sha256:" + "0123456789abcdef" * 4):
        assert limits.image(ref) == ref


def test_duplicate_env_keys_last_wins_like_docker() -> None:
    assert parse_key_values(["A=1", "B=2", "A=3"], "env") == {"A": "3", "B": "2"}


def test_allow_list_globs() -> None:
    assert limits.image_allowed("anything", [])
    assert limits.image_allowed("cloudai/busybox:local", ["ghcr.io/org/*", "cloudai/*"])
    assert not limits.image_allowed("evil.io/cloudai/busybox", ["cloudai/*"])
    assert not limits.image_allowed("busybox", ["busybox:*"])


def test_huge_integers_from_an_api_client() -> None:
    from cloudai.models import parse_cpus, parse_duration, parse_gpus, parse_size

    for parse in (parse_size, parse_cpus, parse_gpus, parse_duration):
        with pytest.raises(ValidationError):
            parse(10**400)  # type: ignore[operator]


def test_submit_refuses_images_outside_the_allow_list(env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "CLOUDAI_ALLOWED_IMAGES": "ghcr.io/org/*,busybox:1.*"}
    code, output = _submit(env, "--dry-run", "busybox:latest", "true")  # the master's own check, run directly
    assert code == 2
    assert "invalid image 'busybox:latest': is not allowed on this cluster; allowed images " \
           "(CLOUDAI_ALLOWED_IMAGES): ghcr.io/org/*, busybox:1.*" in output
    _nothing_recorded(tmp_path)


def test_real_process_with_invalid_utf8_argv(env: dict[str, str], tmp_path: Path) -> None:
    """The real CLI as a shell runs it: bytes that are not UTF-8 arrive as surrogates and are refused."""
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    for args in ([b"--name", b"caf\xe9", b"busybox"], [b"busybox", b"echo caf\xe9"], [b"-e", b"A=\xff", b"busybox"]):
        result = subprocess.run([sys.executable.encode(), b"-m", b"cloudai.cli.main", b"submit", *args], cwd=ROOT,
                                env={**os.environ, **env}, capture_output=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert b"not valid UTF-8" in result.stderr and b"Traceback" not in result.stderr
    _nothing_recorded(tmp_path)


@pytest.mark.parametrize("worker", ["../x", "*", "w" * 300, BAD_UTF8])
def test_hostile_worker_ids_in_worker_commands_are_unknown(tmp_path: Path, worker: str) -> None:
    """What the master's drain, undrain and remove do with an id no worker can have: unknown (404), before the
    store sees it."""
    from cloudai.api import CloudAI
    from cloudai.errors import WorkerNotFound
    from cloudai.models import WorkerState
    from cloudai.settings import Settings

    cloud = CloudAI(Settings(store_url=f"sqlite:///{tmp_path}/s.db", redis_url="redis://127.0.0.1:9/0"))
    for change in (lambda: cloud.set_worker_state(worker, WorkerState.DRAINING),
                   lambda: cloud.set_worker_state(worker, WorkerState.ACTIVE), lambda: cloud.remove_worker(worker)):
        with pytest.raises(WorkerNotFound, match="no worker"):
            change()


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"command": 5}, "invalid command 5: must be text"), ({"env": {"A": 1}}, "must be text"),
     ({"env": ["A=1"]}, "object of strings"), ({"labels": {"k": None}}, "must be text"),
     ({"retries": True}, "invalid retries"), ({"priority": 1.5}, "invalid priority"), ({"image": 3}, "must be text"),
     ({"name": ["x"]}, "must be text")],
)
def test_wrong_types_from_an_api_body(fields: dict[str, object], message: str) -> None:
    request = SubmitRequest(**{"image": "busybox", **fields})  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=message.replace("[", r"\[")):
        request.validate()
