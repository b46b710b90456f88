"""What users type for workloads (issue 24), parsed once: volumes an operator declares, mounts users ask for, the
command rule, container user, IPC, ulimits, shm and GPU device ids. Hostile values are usage errors (exit 2)
before anything is recorded; on the worker, a mount resolves to a directory inside its volume or is refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from cloudai import volumes
from cloudai.cli.main import cli
from cloudai.errors import ConfigError, ValidationError
from cloudai.message import MessageError, RunMessage
from cloudai.models import MiB, Task
from cloudai.runoptions import Ulimit, container_user, gpu_devices, numeric_owner, ulimit_bounds, ulimits_allowed
from cloudai.server.schemas import SubmitBody
from cloudai.store.sqlite import SQLiteStore
from cloudai.submission import build_request
from cloudai.volumes import Mount, MountRefused, Volume, parse_mount, parse_mounts, parse_volumes, resolve


# -- volumes an operator declares ------------------------------------------------------------------------
@pytest.mark.parametrize("text, name, path, mode", [
    ("data=/srv/datasets", "data", "/srv/datasets", "ro"),  # read-only unless :rw
    ("data=/srv/datasets:ro", "data", "/srv/datasets", "ro"),
    ("out=/srv/outputs/{user}:rw", "out", "/srv/outputs/{user}", "rw,per-user"),
    ("home=/srv/{user}/work:rw", "home", "/srv/{user}/work", "rw,per-user"),
    ("Team_2-a=/x", "Team_2-a", "/x", "ro"),
])
def test_volumes_as_operators_declare_them(text: str, name: str, path: str, mode: str) -> None:
    volume = Volume.parse(text)
    assert (volume.name, volume.path, volume.mode) == (name, path, mode)


@pytest.mark.parametrize("text, words", [
    ("data", "use NAME=HOSTPATH"),
    ("da/ta=/x", "volume name 'da/ta'"),  # a name is never a path
    ("..=/x", "volume name '..'"),
    ("d.x=/x", "volume name 'd.x'"),  # a MongoDB field name
    ("=/x", "volume name ''"),
    ("data=relative/dir", "absolute path"),
    ("data=/srv/../etc", "normalised"),
    ("data=/srv/./x", "normalised"),
    ("data=/srv/x/", "normalised"),
    ("data=/", "normalised"),
    ("data=/srv/x:rx", "mode 'rx'"),
    ("data=/srv/u{user}:rw", "one whole path component"),
    ("data=/srv/{user}/{user}:rw", "one whole path component"),
    ("data=/srv/{group}", "the only placeholder is {user}"),
])
def test_bad_volume_declarations_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=None) as refused:
        Volume.parse(text)
    assert words in str(refused.value)


def test_a_volume_declared_twice_is_an_error_and_only_names_and_modes_are_offered() -> None:
    declared = parse_volumes(["data=/srv/d", "out=/srv/o/{user}:rw"])
    assert volumes.offer(declared) == {"data": "ro", "out": "rw,per-user"}  # never a host path
    with pytest.raises(ConfigError, match="declared twice"):
        parse_volumes(["data=/a,data=/b"])


# -- mounts users ask for --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, mount", [
    ("data:/data", Mount("data", "", "/data", "")),
    ("data/imagenet/train:/data:ro", Mount("data", "imagenet/train", "/data", "ro")),
    ("out/./run1//:/out/:rw", Mount("out", "run1", "/out", "rw")),
])
def test_mounts_are_read_into_their_canonical_form(text: str, mount: Mount) -> None:
    assert parse_mount(text) == mount
    assert parse_mount(mount.spec) == mount


@pytest.mark.parametrize("text, words", [
    ("/etc:/x", "volume name ''"),  # a host path is never a mount source
    ("../x:/y", "volume name '..'"),
    ("data/../other:/y", "may not hold '..'"),
    ("data/a/../../..:/y", "may not hold '..'"),
    ("data:relative", "must be absolute"),
    ("data:/x/../proc", "may not hold '..'"),
    ("data:/", "not on /, /proc, /sys or /dev"),
    ("data:/proc/self", "not on /, /proc, /sys or /dev"),
    ("data:/dev", "not on /, /proc, /sys or /dev"),
    ("data:/x:rx", "NAME[/SUBPATH]:CONTAINERPATH[:ro|rw]"),
    ("data:/x:ro:ro", "NAME[/SUBPATH]:CONTAINERPATH[:ro|rw]"),
    ("data", "NAME[/SUBPATH]:CONTAINERPATH[:ro|rw]"),
    ("data:/x\n", "control characters"),
    ("da\x00ta:/x", "control characters"),
    ("", "NAME[/SUBPATH]"),
])
def test_hostile_mounts_are_refused_at_submit(text: str, words: str) -> None:
    with pytest.raises(ValidationError) as refused:
        parse_mount(text)
    assert words in str(refused.value)


def test_two_mounts_on_one_path_and_too_many_mounts_are_refused() -> None:
    with pytest.raises(ValidationError, match="same container path"):
        parse_mounts(["a:/x", "b:/x/"])
    with pytest.raises(ValidationError, match="at most 32"):
        parse_mounts([f"a:/m{i}" for i in range(33)])


# -- on the worker: a mount becomes a bind inside its volume, or a clear refusal --------------------------
@pytest.fixture
def declared(tmp_path: Path) -> dict[str, Volume]:
    (tmp_path / "data" / "sets" / "a").mkdir(parents=True)
    (tmp_path / "data" / "sets" / "inner").symlink_to("a")  # a link that stays inside: fine
    (tmp_path / "data" / "escape").symlink_to("/etc")
    (tmp_path / "out").mkdir()
    return parse_volumes([f"data={tmp_path}/data,out={tmp_path}/out/{{user}}:rw"])


def test_a_mount_resolves_to_the_real_directory_inside_its_volume(declared: dict[str, Volume], tmp_path: Path) -> None:
    bind = resolve(declared, parse_mount("data/sets/inner:/d"), "ana")
    assert (bind.source, bind.target, bind.read_only) == (f"{tmp_path}/data/sets/a", "/d", True)
    bind = resolve(declared, parse_mount("out/run1/ckpt:/o"), "ana")  # made on demand in a writable volume
    assert (bind.source, bind.read_only) == (f"{tmp_path}/out/ana/run1/ckpt", False)
    assert stat.S_IMODE(os.stat(f"{tmp_path}/out/ana").st_mode) == 0o700
    assert resolve(declared, parse_mount("out:/o:ro"), "bo").source == f"{tmp_path}/out/bo"


@pytest.mark.parametrize("mount, words", [
    ("data/escape:/x", "leads outside volume data"),
    ("data/escape/shadow:/x", "leads outside volume data"),
    ("data/nope:/x", "does not exist in the volume"),
    ("data:/x:rw", "is read-only on this worker"),
    ("other:/x", "offers no volume 'other'"),
])
def test_a_mount_that_leads_outside_or_is_not_offered_is_refused(declared: dict[str, Volume], mount: str,
                                                                  words: str) -> None:
    with pytest.raises(MountRefused) as refused:
        resolve(declared, parse_mount(mount), "ana")
    assert words in str(refused.value)


def test_a_link_that_appears_after_realpath_looked_is_refused(declared: dict[str, Volume], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The race: a task swaps a directory of its own volume for a link between the check and the bind. The
    walk after realpath opens each component with O_NOFOLLOW, so what is bound is what was checked."""
    (tmp_path / "out" / "ana").mkdir(mode=0o700)
    (tmp_path / "out" / "ana" / "swapped").symlink_to("/etc")
    real = os.path.realpath
    monkeypatch.setattr(volumes.os.path, "realpath", lambda p: p if p.endswith("swapped") else real(p))
    with pytest.raises(MountRefused, match="swapped is a symbolic link"):
        resolve(declared, parse_mount("out/swapped:/x"), "ana")


def test_a_users_directory_that_is_a_link_is_refused(declared: dict[str, Volume], tmp_path: Path) -> None:
    (tmp_path / "out" / "mallory").symlink_to(tmp_path / "out" / "ana")
    with pytest.raises(MountRefused, match="mallory is a symbolic link"):
        resolve(declared, parse_mount("out:/o"), "mallory")


# -- container options -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, spec", [("nofile=1024", "nofile=1024:1024"), ("nofile=100:200", "nofile=100:200"),
                                        ("memlock=-1", "memlock=-1:-1"), ("stack=unlimited", "stack=-1:-1"),
                                        ("memlock=1024:unlimited", "memlock=1024:-1")])
def test_ulimits(text: str, spec: str) -> None:
    assert Ulimit.parse(text).spec == spec


@pytest.mark.parametrize("text", ["nofile", "nofile=", "nofiles=1", "nofile=-2", "nofile=1e9", "nofile=200:100",
                                  "nofile=unlimited:100", "nofile=99999999999999999999", "NOFILE=1", "nofile=1:2:3"])
def test_bad_ulimits(text: str) -> None:
    with pytest.raises(ValidationError, match="invalid ulimit"):
        Ulimit.parse(text)


def test_ulimit_bounds_of_the_operator() -> None:
    bounds = ulimit_bounds("nofile=4096,memlock=unlimited")
    assert ulimits_allowed([Ulimit.parse("nofile=4096"), Ulimit.parse("memlock=-1")], bounds) is None
    assert "at most 4096" in (ulimits_allowed([Ulimit.parse("nofile=1024:8192")], bounds) or "")
    assert "at most 4096" in (ulimits_allowed([Ulimit.parse("nofile=-1")], bounds) or "")
    assert "core is not allowed" in (ulimits_allowed([Ulimit.parse("core=0")], bounds) or "")
    with pytest.raises(ConfigError, match="CLOUDAI_ULIMITS"):
        ulimit_bounds("nofile=lots")


@pytest.mark.parametrize("good", ["1000", "1000:1000", "0:0", "nobody", "www-data:www-data", "_svc"])
def test_container_users(good: str) -> None:
    assert container_user(good) == good


@pytest.mark.parametrize("bad", ["", "1000:", ":1000", "root;rm -rf /", "a b", "1000:1000:1", "-1", "$(id)",
                                 "x" * 40, "12345678901"])
def test_bad_container_users(bad: str) -> None:
    with pytest.raises(ValidationError, match="invalid container user"):
        container_user(bad)


def test_numeric_owner_of_the_directories_made_for_a_task() -> None:
    assert [numeric_owner(u) for u in ("1000", "1000:50", "nobody", None)] == [(1000, 1000), (1000, 50), None, None]


@pytest.mark.parametrize("text, ids", [("2", None), ("device=0", ["0"]), ('"device=1,3"', ["1", "3"]),
                                       ("device=GPU-8a3f2c", ["GPU-8a3f2c"])])
def test_gpu_devices(text: str, ids: list[str] | None) -> None:
    assert gpu_devices(text) == ids


@pytest.mark.parametrize("bad, words", [("device=", "device=ID"), ("device=0,0", "twice"), ("device=a/b", "device=ID"),
                                        ("device=0,,1", "device=ID")])
def test_bad_gpu_devices(bad: str, words: str) -> None:
    with pytest.raises(ValidationError) as refused:
        gpu_devices(bad)
    assert words in str(refused.value)


def test_the_command_rule_in_a_request() -> None:
    argv = build_request(image="busybox", args=["python", "train.py", "--epochs", "3"])
    assert argv.run_args() == ["python", "train.py", "--epochs", "3"] and argv.command is None
    shell = build_request(image="busybox", command="echo a; exit 3")
    assert shell.run_args() == ["/bin/sh", "-c", "echo a; exit 3"]
    with pytest.raises(ValidationError, match="not both"):
        build_request(image="busybox", command="echo", args=["echo"])
    # the API: a list is arguments, a string a shell line
    assert SubmitBody(image="busybox", command=["a", "b c"]).to_request("ana").run_args() == ["a", "b c"]
    assert SubmitBody(image="busybox", command="a; b").to_request("ana").run_args() == ["/bin/sh", "-c", "a; b"]
    gpus = SubmitBody(image="busybox", gpus="device=0,1").to_request("ana")
    assert gpus.gpu_devices == ["0", "1"] and gpus.resources.gpus == 2


def test_shm_counts_against_memory() -> None:
    assert build_request(image="busybox", memory="1g", shm_size="1g").shm_size == 1024 * MiB
    with pytest.raises(ValidationError, match="counts against the memory limit"):
        build_request(image="busybox", memory="1g", shm_size="2g")


def test_a_record_from_before_args_runs_its_command_as_it_always_did() -> None:
    old = Task(task_id="t1", user_id="u", docker_image="img").to_doc()
    del old["args"], old["entrypoint"]
    old["command"] = "echo a; exit 3"
    task = Task.from_doc(old)
    assert (task.entrypoint, task.args, task.command) == ("/bin/sh", ["-c", "echo a; exit 3"], "echo a; exit 3")


def test_the_message_carries_how_the_container_runs() -> None:
    task = Task(task_id="t1", user_id="ana", docker_image="busybox", worker_id="w1", args=["a", "b c"],
                entrypoint="", mounts=["data:/data:ro"], shm_size=256 * MiB, container_user="1000:1000", ipc="none",
                ulimits=["nofile=1:2"], gpu_ids=["1"])
    wire = RunMessage.from_task(task).to_wire()
    assert wire["version"] == 3 and wire["args"] == ["a", "b c"] and wire["mounts"] == ["data:/data:ro"]
    assert RunMessage.from_wire(wire) == RunMessage.from_task(task)
    with pytest.raises(MessageError, match="version 2 is not understood"):
        RunMessage.from_wire({**wire, "version": 2})


# -- the CLI: every hostile value is exit 2 and nothing is recorded ---------------------------------------
@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"CLOUDAI_STORE_URL": f"sqlite:///{tmp_path}/s.db", "CLOUDAI_REDIS_URL": "redis://127.0.0.1:9/0",
            "CLOUDAI_USER": "ana"}


@pytest.mark.parametrize("args, words", [
    (["--mount", "/etc:/x", "busybox"], "invalid mount '/etc:/x'"),
    (["--mount", "data/../../etc:/x", "busybox"], "may not hold '..'"),
    (["--mount", "data:/proc", "busybox"], "not on /, /proc"),
    (["--mount", "a:/x", "--mount", "b:/x", "busybox"], "same container path"),
    (["--shm-size", "2g", "-m", "1g", "busybox"], "counts against the memory limit"),
    (["--shm-size", "lots", "busybox"], "invalid shm-size"),
    (["-u", "root;id", "busybox"], "invalid container user"),
    (["--ipc", "container:abc", "busybox"], "invalid ipc"),
    (["--ipc", "host", "busybox"], "CLOUDAI_ALLOW_HOST_IPC"),
    (["--ulimit", "core=1", "busybox"], "--ulimit core is not allowed"),
    (["--ulimit", "nofile=2000000", "busybox"], "may be at most 1048576"),
    (["--ulimit", "nofile=1", "--ulimit", "nofile=2", "busybox"], "given twice"),
    (["--gpus", "device=0,0", "busybox"], "twice"),
    (["--gpus", "all", "busybox"], "invalid gpus 'all'"),
    (["--entrypoint", "a\x00b", "busybox"], "NUL byte"),
    (["--shell", "busybox"], "--shell needs a command line"),
])
def test_hostile_workload_values_are_usage_errors(env: dict[str, str], tmp_path: Path, args: list[str],
                                                   words: str) -> None:
    result = CliRunner().invoke(cli, ["submit", "--dry-run", *args], env=env)
    assert result.exit_code == 2, result.output[:500]
    assert words in result.output, result.output[:500]
    assert SQLiteStore(f"{tmp_path}/s.db").list_tasks(limit=None) == []


def test_the_operator_may_allow_host_ipc_and_other_ulimits(env: dict[str, str]) -> None:
    """Past the operator's bounds, a dry run reaches placement (which finds no worker here)."""
    env = {**env, "CLOUDAI_ALLOW_HOST_IPC": "1", "CLOUDAI_ULIMITS": "core=0"}
    result = CliRunner().invoke(cli, ["submit", "--dry-run", "--ipc", "host", "--ulimit", "core=0", "busybox"], env=env)
    assert "no workers are registered" in result.output, result.output
