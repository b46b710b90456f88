"""Validate once (issue 22): every bound on a submitted value is defined in cloudai.limits and checked by one
function (cloudai.submission.build_request), so the CLI, the API and the web form give the same message for the
same bad value, and no entry point has a second number. On the app in-process and the CLI through CliRunner:
bad values are refused before Redis or the store is touched."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from cloudai import limits, outputs, runoptions, tokens, volumes
from cloudai.cli.main import cli
from cloudai.errors import ValidationError
from cloudai.server import create_app, csrf
from cloudai.server.schemas import SubmitBody
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore

KiB = limits.KiB
WEB = Path(__file__).resolve().parents[2] / "cloudai" / "web"


@dataclass
class Bad:
    """One bad value as each entry point takes it: ``cli`` the options before IMAGE (and ``command`` after),
    ``api`` a JSON body's fields (numbers as JSON numbers), ``form`` the web form's fields as typed (None: the
    form has no such field)."""

    what: str
    cli: list[str]
    api: dict[str, Any]
    form: dict[str, str] | None = None
    image: str = "busybox"
    command: list[str] = field(default_factory=lambda: ["true"])
    message: str = ""  # a part of the expected message


def _env(n: int) -> list[str]:
    return [f"K{i}=v" for i in range(n)]


BAD = [
    Bad("too many env entries", [f"--env={e}" for e in _env(1001)], {"env": dict(e.split("=") for e in _env(1001))},
        {"env": "\n".join(_env(1001))}, message="invalid env '1001 variables': the most is 1000"),
    Bad("an env value over 32 KiB", ["-e", "A=" + "v" * (32 * KiB + 1)], {"env": {"A": "v" * (32 * KiB + 1)}},
        {"env": "A=" + "v" * (32 * KiB + 1)}, message="the most is 32 KiB"),
    Bad("an env line without =", ["-e", "NOVALUE"], {"env": ["NOVALUE"]}, {"env": "NOVALUE"},
        message="invalid env 'NOVALUE': use KEY=VALUE"),
    Bad("an env key starting with a digit", ["-e", "1BAD=x"], {"env": {"1BAD": "x"}}, {"env": "1BAD=x"},
        message="invalid env '1BAD'"),
    Bad("a reserved env variable", ["-e", "NVIDIA_VISIBLE_DEVICES=all"], {"env": {"NVIDIA_VISIBLE_DEVICES": "all"}},
        {"env": "NVIDIA_VISIBLE_DEVICES=all"}, message="ask for GPUs with --gpus"),
    Bad("a constraint without a key", ["--constraint", "=x"], {"constraints": ["=x"]}, {"constraints": "=x"},
        message="invalid constraint '=x': use KEY=VALUE"),
    Bad("a too-long image", [], {"image": "a" * 513}, {"image": "a" * 513}, image="a" * 513,
        message="is 513 characters; the most is 512"),
    Bad("an upper-case image", [], {"image": "BusyBox"}, {"image": "BusyBox"}, image="BusyBox",
        message="repository names are lower case"),
    Bad("a too-long command", [], {"command": "x" * (128 * KiB)}, {"command": "x" * (128 * KiB)},
        command=["x" * (128 * KiB)], message="the most is 128 KiB"),
    Bad("a bare memory number", ["-m", "512"], {"memory": 512}, {"memory": "512"},
        message="invalid memory '512': a bare number is bytes, and Docker needs at least 6m; did you mean 512g?"),
    Bad("a fractional bare memory number", ["-m", "0.5"], {"memory": 0.5}, {"memory": "0.5"},
        message="did you mean 0.5g?"),
    Bad("memory with an unknown unit", ["-m", "4x"], {"memory": "4x"}, {"memory": "4x"},
        message="invalid memory '4x'"),
    Bad("memory below Docker's minimum", ["-m", "1m"], {"memory": "1m"}, {"memory": "1m"},
        message="Docker needs at least 6m"),
    Bad("memory over 64t", ["-m", "65t"], {"memory": "65t"}, {"memory": "65t"}, message="at most 64t"),
    Bad("zero cpus", ["--cpus", "0"], {"cpus": 0}, {"cpus": "0"}, message="invalid cpus '0'"),
    Bad("cpus as a word", ["--cpus", "two"], {"cpus": "two"}, {"cpus": "two"}, message="invalid cpus 'two'"),
    Bad("too many cpus", ["--cpus", "2000"], {"cpus": 2000}, {"cpus": "2000"}, message="at most 1024"),
    Bad("half a gpu", ["--gpus", "1.5"], {"gpus": 1.5}, {"gpus": "1.5"}, message="whole number of GPUs"),
    Bad("too many gpus", ["--gpus", "65"], {"gpus": 65}, {"gpus": "65"}, message="from 0 to 64"),
    Bad("a negative timeout", ["--timeout=-5"], {"timeout": -5}, {"timeout": "-5"},
        message="invalid timeout '-5': must be from 0"),
    Bad("a timeout as a word", ["--timeout", "soon"], {"timeout": "soon"}, {"timeout": "soon"},
        message="invalid timeout 'soon'"),
    Bad("a label with the reserved prefix", ["-l", "cloudai.task_id=x"], {"labels": {"cloudai.task_id": "x"}},
        message="keys starting with 'cloudai.' are CloudAI's own"),
    Bad("too many labels", [f"--label=k{i}=v" for i in range(101)], {"labels": {f"k{i}": "v" for i in range(101)}},
        message="invalid label '101 entries': the most is 100"),
    Bad("a bare storage number", ["--storage", "10"], {"storage": 10}, message="did you mean 10g?"),
    Bad("too many retries", ["--retries", "101"], {"retries": 101},
        message="invalid retries '101': use a whole number from 0 to 100"),
    Bad("negative retries", ["--retries=-1"], {"retries": -1}, message="invalid retries '-1'"),
    Bad("a priority out of range", ["--priority", "1000001"], {"priority": 1000001}, message="invalid priority"),
    Bad("an unknown pull policy", ["--pull", "sometimes"], {"pull": "sometimes"},
        message="invalid pull policy 'sometimes': use one of missing, always, never"),
    Bad("a relative workdir", ["-w", "rel/dir"], {"workdir": "rel/dir"}, message="use an absolute path"),
    Bad("a too-long name", ["--name", "n" * 201], {"name": "n" * 201}, {"name": "n" * 201},
        message="the most is 200"),
    Bad("a worker id with a slash", ["--worker", "../etc"], {"worker": "../etc"}, {"worker": "../etc"},
        message="invalid worker '../etc'"),
    Bad("too many dependencies", ["--after", ",".join(f"t{i}" for i in range(101))],
        {"after": [f"t{i}" for i in range(101)]}, message="a task may wait for at most 100 others"),
]


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    # Redis on a port where nothing listens: validation must come first
    settings = Settings(store_url=f"sqlite:///{tmp_path / 's.db'}", redis_url="redis://127.0.0.1:9/0")
    return TestClient(create_app(settings))


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    return {"CLOUDAI_STORE_URL": f"sqlite:///{tmp_path / 's.db'}", "CLOUDAI_REDIS_URL": "redis://127.0.0.1:9/0",
            "CLOUDAI_USER": "ana"}


def cli_message(cli_env: dict[str, str], bad: Bad) -> str:
    result = CliRunner().invoke(cli, ["submit", "--dry-run", *bad.cli, bad.image, *bad.command], env=cli_env)
    assert result.exit_code == 2, result.output[:500]
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output[:500]
    return errors[0].removeprefix("Error: ")


def api_message(client: TestClient, body: dict[str, Any], headers: dict[str, str], dry_run: bool = True) -> str:
    r = client.post("/v1/tasks", params={"dry_run": "true"} if dry_run else None, json=body, headers=headers)
    assert r.status_code == 422, r.text[:500]
    error = r.json()["error"]
    assert error["type"] == "ValidationError" and error["exit_code"] == 2
    return str(error["message"])


def form_body(fields: dict[str, str]) -> dict[str, Any]:
    """What the submit page's script (cloudai/web/static/app.js, initSubmit) posts: the trimmed text of each
    filled-in field, the command as typed, and the env and constraints textareas as their non-blank lines."""
    body: dict[str, Any] = {"image": fields.get("image", "busybox").strip()}
    for name in ("command", "name", "cpus", "memory", "gpus", "timeout", "worker"):
        value = fields.get(name, "true" if name == "command" else "")
        if value.strip():
            body[name] = value if name == "command" else value.strip()
    for name in ("env", "constraints"):
        body[name] = [line.strip() for line in fields.get(name, "").split("\n") if line.strip()]
    return body


def test_the_form_script_posts_what_form_body_builds() -> None:
    """form_body mirrors the script: the same fields, sent as lines, with no check of its own in between."""
    script = (WEB / "static" / "app.js").read_text()
    submit = script[script.index("function initSubmit()"):script.index("// ---- sign in / out")]
    assert '["command", "name", "cpus", "memory", "gpus", "timeout", "worker"]' in submit
    assert "body.env = lines(form.elements.env.value)" in submit
    assert "body.constraints = lines(form.elements.constraints.value)" in submit
    assert "throw" not in submit and "catch (err)" in submit  # its only messages are the API's


@pytest.mark.parametrize("bad", BAD, ids=[b.what for b in BAD])
def test_the_cli_the_api_and_the_web_form_give_the_same_message(bad: Bad, client: TestClient,
                                                                 cli_env: dict[str, str], tmp_path: Path) -> None:
    from_cli = cli_message(cli_env, bad)
    assert bad.message in from_cli
    secret = tokens.create(client.app.state.cloud.store, "ana")[0]  # type: ignore[attr-defined]
    body = {"image": bad.image, "command": " ".join(bad.command), **bad.api}
    assert api_message(client, body, {"Authorization": f"Bearer {secret}"}) == from_cli
    if bad.form is not None:  # the browser's request: the session cookie and the CSRF header, no dry run
        client.post("/login", data={"token": secret})
        headers = {"X-CSRF-Token": csrf.token_for(client.cookies["cloudai_session"])}
        form = {"image": bad.image, "command": " ".join(bad.command), **bad.form}
        assert api_message(client, form_body(form), headers, dry_run=False) == from_cli
    assert SQLiteStore(str(tmp_path / "s.db")).list_tasks(limit=None) == []


# Each bound of limits.py on a submit field: a value at it is taken, one past it refused with limits' message.
# (field, value at the bound, value past it, what the message says)
AT_AND_PAST = [
    ("image", "a" * limits.MAX_IMAGE_CHARS, "a" * (limits.MAX_IMAGE_CHARS + 1), "invalid image"),
    ("command", "x" * limits.MAX_COMMAND_BYTES, "x" * (limits.MAX_COMMAND_BYTES + 1), "invalid command"),
    ("command", ["x" * limits.MAX_COMMAND_BYTES], ["x" * (limits.MAX_COMMAND_BYTES + 1)], "invalid command"),
    ("command", ["a"] * limits.MAX_ARGS, ["a"] * (limits.MAX_ARGS + 1), "invalid command"),
    ("command", ["x" * 100_000, "y" * 100_000], ["x" * 100_000, "y" * 100_000, "z" * 100_000], "invalid command"),
    ("mounts", [f"v:/m{i}" for i in range(volumes.MAX_MOUNTS)], [f"v:/m{i}" for i in range(volumes.MAX_MOUNTS + 1)],
     "invalid mount"),
    ("ulimits", [f"{n}=1" for n in runoptions.ULIMIT_NAMES], [f"{n}=1" for n in runoptions.ULIMIT_NAMES] + ["core=2"],
     "invalid ulimit"),
    ("env", {f"K{i}": "v" for i in range(limits.MAX_ENV_ENTRIES)},
     {f"K{i}": "v" for i in range(limits.MAX_ENV_ENTRIES + 1)}, "invalid env"),
    ("env", {"A": "v" * limits.MAX_ENV_VALUE_BYTES}, {"A": "v" * (limits.MAX_ENV_VALUE_BYTES + 1)}, "invalid env A"),
    ("env", {"K" * limits.MAX_KEY_CHARS: "v"}, {"K" * (limits.MAX_KEY_CHARS + 1): "v"}, "invalid env key"),
    ("labels", {f"k{i}": "v" for i in range(limits.MAX_LABELS)}, {f"k{i}": "v" for i in range(limits.MAX_LABELS + 1)},
     "invalid label"),
    ("labels", {"k": "v" * limits.MAX_LABEL_VALUE_CHARS}, {"k": "v" * (limits.MAX_LABEL_VALUE_CHARS + 1)},
     "invalid label k"),
    ("constraints", {f"k{i}": "v" for i in range(limits.MAX_LABELS)},
     {f"k{i}": "v" for i in range(limits.MAX_LABELS + 1)}, "invalid constraint"),
    ("name", "n" * limits.MAX_NAME_CHARS, "n" * (limits.MAX_NAME_CHARS + 1), "invalid name"),
    ("workdir", "/" + "w" * (limits.MAX_WORKDIR_CHARS - 1), "/" + "w" * limits.MAX_WORKDIR_CHARS, "invalid workdir"),
    ("worker", "w" * limits.MAX_ID_CHARS, "w" * (limits.MAX_ID_CHARS + 1), "invalid worker"),
    ("after", [f"t{i}" for i in range(limits.MAX_DEPENDENCIES)], [f"t{i}" for i in range(limits.MAX_DEPENDENCIES + 1)],
     "invalid after"),
    ("retries", limits.MAX_RETRIES, limits.MAX_RETRIES + 1, "invalid retries"),
    ("priority", limits.MAX_PRIORITY, limits.MAX_PRIORITY + 1, "invalid priority"),
    ("priority", -limits.MAX_PRIORITY, -limits.MAX_PRIORITY - 1, "invalid priority"),
    ("cpus", limits.MAX_CPUS, limits.MAX_CPUS + 1, "invalid cpus"),
    ("gpus", limits.MAX_GPUS, limits.MAX_GPUS + 1, "invalid gpus"),
    ("timeout", limits.MAX_TIMEOUT_S, limits.MAX_TIMEOUT_S + 1, "invalid timeout"),
    ("memory", limits.MIN_MEMORY_BYTES, limits.MIN_MEMORY_BYTES - 1, "invalid memory"),
    ("memory", limits.MAX_MEMORY_BYTES, limits.MAX_MEMORY_BYTES + 1, "invalid memory"),
    ("storage", limits.MAX_MEMORY_BYTES, limits.MAX_MEMORY_BYTES + 1, "invalid storage"),
]


@pytest.mark.parametrize("name, at, past, message", AT_AND_PAST, ids=[f"{a[0]}-{i}" for i, a in enumerate(AT_AND_PAST)])
def test_each_bound_is_the_one_of_limits_and_no_other(name: str, at: object, past: object, message: str) -> None:
    base = {"image": "busybox", "command": "true"}
    assert SubmitBody(**{**base, name: at}).to_request("ana") is not None  # type: ignore[arg-type]
    body = SubmitBody(**{**base, name: past})  # type: ignore[arg-type]  # pydantic takes it: no bound of its own
    with pytest.raises(ValidationError) as refused:
        body.to_request("ana")
    assert str(refused.value).startswith(message)


def test_the_schema_shows_the_bounds_of_limits_and_pydantic_checks_none() -> None:
    props = SubmitBody.model_json_schema()["properties"]
    shown = {
        ("image", "maxLength"): limits.MAX_IMAGE_CHARS, ("workdir", "maxLength"): limits.MAX_WORKDIR_CHARS,
        ("name", "maxLength"): limits.MAX_NAME_CHARS, ("worker", "maxLength"): limits.MAX_ID_CHARS,
        ("env", "maxProperties"): limits.MAX_ENV_ENTRIES, ("env", "maxItems"): limits.MAX_ENV_ENTRIES,
        ("labels", "maxProperties"): limits.MAX_LABELS, ("constraints", "maxProperties"): limits.MAX_LABELS,
        ("after", "maxItems"): limits.MAX_DEPENDENCIES, ("retries", "maximum"): limits.MAX_RETRIES,
        ("priority", "maximum"): limits.MAX_PRIORITY, ("priority", "minimum"): -limits.MAX_PRIORITY,
        ("cpus", "maximum"): limits.MAX_CPUS, ("gpus", "maximum"): limits.MAX_GPUS,
        ("timeout", "maximum"): limits.MAX_TIMEOUT_S, ("memory", "minimum"): limits.MIN_MEMORY_BYTES,
        ("memory", "maximum"): limits.MAX_MEMORY_BYTES, ("storage", "maximum"): limits.MAX_MEMORY_BYTES,
        ("labels", "maxItems"): limits.MAX_LABELS, ("constraints", "maxItems"): limits.MAX_LABELS,
        ("timeout", "minimum"): 0, ("gpus", "minimum"): 0, ("retries", "minimum"): 0,  # none below 0
        ("command", "maxItems"): limits.MAX_ARGS, ("mounts", "maxItems"): volumes.MAX_MOUNTS,
        ("ulimits", "maxItems"): runoptions.MAX_ULIMITS, ("outputs", "maxItems"): outputs.MAX_OUTPUTS,
    }
    assert {key: props[key[0]].get(key[1]) for key in shown} == shown
    assert "128 KiB" in props["command"]["description"]
    # every bound keyword in the schema is one of those (nothing else derived from another number)
    keywords = ("maxLength", "minLength", "maxItems", "minItems", "maxProperties", "minimum", "maximum")
    found = {(name, k) for name, prop in props.items() for k in keywords if k in prop}
    assert found == set(shown)
    # pydantic itself checks no bound (a bound is build_request's, with its message)
    assert {name: f.metadata for name, f in SubmitBody.model_fields.items() if f.metadata} == {}


def test_the_cli_and_the_form_have_no_second_number() -> None:
    """click checks no range or choice of `submit` (build_request does), and the form's inputs carry no bound."""
    command = cli.commands["submit"]
    typed = [p.name for p in command.params
             if isinstance(p.type, click.IntRange | click.FloatRange | click.Choice | click.types.IntParamType)]
    assert typed == []
    page = (WEB / "templates" / "submit.html").read_text()
    assert not re.search(r"\b(maxlength|minlength|min|max|pattern|step)=", page)
