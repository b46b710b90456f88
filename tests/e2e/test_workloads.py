"""Workloads as users meet them (issue 24): a real `cloudai server`, a real `cloudai worker start --volume ...`,
and the CLI in API mode with two users' tokens. A training-style task reads a read-only dataset volume, fails
to write it and writes its checkpoint into its user's own outputs directory; another user sees none of it; an
image's ENTRYPOINT runs as `docker run` runs it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from cloudai.models import TaskStatus
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import ROOT, ServerProc, cloudai, docker_run, entrypoint_image
from tests.services import TEST_IMAGE

S = TaskStatus


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cloudai(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_a_training_job_reads_its_dataset_and_writes_only_its_users_outputs(
    api_server: ServerProc, settings: Settings, store: SQLiteStore, workers, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    data, outputs = tmp_path / "datasets", tmp_path / "outputs"
    (data / "mnist").mkdir(parents=True)
    (data / "mnist" / "train.txt").write_text("60000 images\n")
    (data / "escape").symlink_to("/etc")
    outputs.mkdir()
    workers(None, "--cpus", "4", "--memory", "8g", "--gpus", "none", "--volume", f"data={data}:ro",
            "--volume", f"outputs={outputs}/{{user}}:rw")
    ana = api_server.cli_env(api_server.token("ana"))
    bo = api_server.cli_env(api_server.token("bo"))
    image = entrypoint_image()

    # every user sees what each worker offers: names and modes, never a host path
    listed = cli(ana, "workers", "--json")
    assert json.loads(listed.stdout)[0]["volumes"] == {"data": "ro", "outputs": "rw,per-user"}
    assert str(tmp_path) not in listed.stdout
    assert "data(ro) outputs(rw,per-user)" in cli(ana, "workers").stdout

    # the job: its image's entrypoint runs first; /dev/shm as asked; the dataset read-only; a non-root user
    script = ("df -k /dev/shm | tail -1; cat /data/train.txt; (echo x > /data/train.txt) 2>/dev/null "
              "|| echo write-refused; echo weights > /out/model.ckpt; id")
    job = cli(ana, "submit", "-f", "-m", "1g", "--shm-size", "256m", "-u", "1000:1000", "--mount",
              "data/mnist:/data:ro", "--mount", "outputs/run1:/out", image, "sh", "-c", script)
    assert job.returncode == 0, job.stdout + job.stderr
    lines = job.stdout.splitlines()
    assert lines[0] == "entrypoint-ran" and lines[1].split()[1] == str(256 * 1024)
    assert lines[2:5] == ["60000 images", "write-refused", "uid=1000 gid=1000 groups=1000"]
    assert (outputs / "ana" / "run1" / "model.ckpt").read_text() == "weights\n"
    assert (data / "mnist" / "train.txt").read_text() == "60000 images\n"

    # another user's task gets its own directory: ana's checkpoint is not there to read or overwrite
    peek = cli(bo, "submit", "-f", "--mount", "outputs:/out", TEST_IMAGE, "--", "sh", "-c",
               "ls -A /out; ls /out/run1 2>&1; echo mine > /out/model.ckpt")
    assert peek.returncode == 0 and peek.stdout.splitlines()[:1] == ["ls: /out/run1: No such file or directory"]
    assert (outputs / "ana" / "run1" / "model.ckpt").read_text() == "weights\n"
    assert (outputs / "bo" / "model.ckpt").read_text() == "mine\n"

    # hostile mounts: refused at submit (exit 2, nothing recorded) or by the worker with a clear reason
    before = len(store.list_tasks(limit=None))
    for args, words in ((["--mount", "nosuch:/x"], "no registered worker offers volume nosuch"),
                        (["--mount", "data:/x:rw"], "no registered worker offers volume data (rw)"),
                        (["--mount", "data/../..:/x"], "may not hold '..'"),
                        (["--mount", f"{data}:/x"], "invalid mount")):
        refused = cli(ana, "submit", *args, TEST_IMAGE, "true")
        assert refused.returncode == 2 and words in refused.stderr, (args, refused.stderr)
    assert len(store.list_tasks(limit=None)) == before
    escape = cli(ana, "submit", "-f", "--mount", "data/escape:/x", TEST_IMAGE, "--", "cat", "/x/hostname")
    assert escape.returncode == 125 and "leads outside volume data" in escape.stdout, escape.stdout


def test_commands_run_as_docker_run_runs_them_through_the_master(
    api_server: ServerProc, settings: Settings, store: SQLiteStore, workers  # type: ignore[no-untyped-def]
) -> None:
    workers()
    env = api_server.cli_env(api_server.token("ana"))
    image = entrypoint_image()
    for options, args in (([], []), ([], ["echo", "hi"]), (["--entrypoint", "/bin/echo"], ["a", "b  c"]),
                          (["--entrypoint", ""], ["echo", "cleared"])):
        expected, code = docker_run(*options, image, *args)
        result = cli(env, "submit", "-f", *options, image, "--", *args)
        assert result.returncode == code and result.stdout.splitlines()[:-1] == expected, (options, result.stdout)
    # a shell line needs --shell; as one plain argument it is a program's name, as for docker run
    shell = cli(env, "submit", "-f", "--shell", image, "echo a; exit 3")
    assert shell.returncode == 3 and shell.stdout.splitlines()[:2] == ["entrypoint-ran", "a"]
    plain = cli(env, "submit", "-f", TEST_IMAGE, "echo a; exit 3")
    assert plain.returncode == 125 and "--shell" in plain.stdout
    # the original syntax keeps running its command line with /bin/sh -c, in place of the entrypoint
    seed = cli(env, "task", settings.worker_id, image, "-mem", "0.25", "echo seed; echo syntax")
    task_id = seed.stdout.split()[0]
    follow = cli(env, "monitor", task_id)
    assert [ln for ln in follow.stdout.splitlines() if ln in ("seed", "syntax", "entrypoint-ran")] == ["seed", "syntax"]
    task = store.get_task(task_id)
    assert task is not None and (task.entrypoint, task.args) == ("/bin/sh", ["-c", "echo seed; echo syntax"])
