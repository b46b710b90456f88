"""``cloudai``: submit containers to the cluster, follow their logs, manage workers."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import click

from cloudai.cli import artifacts_cli, cmdserver_cli
from cloudai.cli import quota as quota_cli
from cloudai.cli.local import LocalCommand, LocalGroup
from cloudai.cli.shutdown import SERVICES, ExitPlan, exit_now
from cloudai.errors import CloudAIError, ExitCode, NeedsMaster, RedisUnavailable

# TaskStatus's values (tests/unit check they match), so that defining `list --status` needs no models import
STATUSES = ("pending", "queued", "running", "completed", "failed", "cancelled", "timeout", "lost")

# Each command imports what it uses when it runs: `cloudai --help` (and a mistyped option) loads click and
# the command definitions only, not the models, the clients, Redis or rich.
if TYPE_CHECKING:
    from cloudai.api import CloudAI
    from cloudai.cli.client import Client
    from cloudai.settings import Settings
    from cloudai.submission import SubmitRequest


@dataclass
class Context:
    """Passed to every command (click's ``make_pass_decorator``); the connections open on first use."""

    settings: Settings

    @cached_property
    def api(self) -> Client:
        """The master's API when ``CLOUDAI_API_URL`` (or ``cloudai login``) says so, else the operator's
        read-only view of the cluster (direct mode: Redis and the store, never a change)."""
        from cloudai.cli.client import open_client

        return open_client(self.settings)

    def master(self, command: str) -> Client:
        """The master's API, for a command that changes the cluster: users have one front door, and tasks
        are placed only by the long-lived processes (:class:`NeedsMaster` without an API URL)."""
        from cloudai.cli.client import api_target

        if api_target(self.settings) is None:
            raise NeedsMaster(command)
        return self.api

    @cached_property
    def direct(self) -> CloudAI:
        """The cluster itself (Redis and the store), for operator commands such as ``cloudai admin``."""
        from cloudai.api import CloudAI

        return CloudAI(self.settings)

    def default_user(self) -> str:
        """Whose tasks ``list`` shows by default: the token's user through the API, else ``CLOUDAI_USER``."""
        whoami = getattr(self.api, "default_user", None)
        return whoami() if whoami is not None else self.settings.user


pass_ctx = click.make_pass_decorator(Context)


class CloudAIGroup(click.Group):
    """Turns CloudAI errors into a clear message and the documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CloudAIError as exc:
            from cloudai.cli import render

            click.echo(click.style("Error: ", fg="red", bold=True) + render.visible(exc, keep_lines=True), err=True)
            ctx.exit(int(exc.exit_code))
        except Exception as exc:
            redis = sys.modules.get("redis")  # imported only in direct mode
            if redis is None or not isinstance(exc, redis.RedisError):
                raise
            url = ctx.obj.settings.redis_url if isinstance(ctx.obj, Context) else "?"
            click.echo(click.style("Error: ", fg="red", bold=True) + str(RedisUnavailable(url, exc)), err=True)
            ctx.exit(int(ExitCode.UNAVAILABLE))


@click.group(cls=CloudAIGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--redis-url", envvar="CLOUDAI_REDIS_URL", help="Broker and log bus.  [env: CLOUDAI_REDIS_URL]")
@click.option("--store-url", envvar="CLOUDAI_STORE_URL",
              help="mongodb://... or sqlite:///path.  [env: CLOUDAI_STORE_URL]")
@click.version_option(package_name="cloudai")
@click.pass_context
def cli(ctx: click.Context, redis_url: str | None, store_url: str | None) -> None:
    """CloudAI runs containers on a pool of GPU and CPU hosts.

    \b
    Tasks:    submit, task, monitor, logs, status, list, cancel, artifacts, cp
    Cluster:  workers, worker start, beat, flower, server, admin token
    Identity: login, logout, whoami

    Task and worker commands go through the master's API (CLOUDAI_API_URL and CLOUDAI_TOKEN, or `cloudai
    login URL`). Without it, operators on the cluster network can still read (monitor, logs, status, list,
    workers) from Redis and the store directly; every change needs the master.
    """
    from cloudai.settings import Settings

    if isinstance(ctx.obj, ExitPlan):  # run as the console script: see main()
        ctx.obj.fast = ctx.invoked_subcommand not in SERVICES
    try:
        settings = Settings.from_env().replace(redis_url=redis_url, store_url=store_url)
    except CloudAIError as exc:
        raise click.UsageError(str(exc)) from exc
    ctx.obj = Context(settings)


def _parse(fn: Any, *args: Any, param: str) -> Any:
    """Validation errors of option values as click usage errors (exit 2, nothing recorded)."""
    try:
        return fn(*args)
    except CloudAIError as exc:
        raise click.BadParameter(str(exc), param_hint=param) from exc


def _submit(ctx: Context, request: SubmitRequest, quiet: bool, as_json: bool, follow: bool, dry_run: bool,
            command: str = "submit", upload: str | None = None) -> None:
    from cloudai.cli import render
    from cloudai.models import TaskStatus as S

    packed = None
    if upload is not None:  # packed and checked here: past the cap is exit 2 before anything is sent
        from cloudai.models import format_bytes
        from cloudai.uploads import pack, parse_upload

        local, request.upload = parse_upload(upload)
        request.validate()
        packed = pack(local, ctx.settings.upload_max_bytes)
        left_out = f"; {packed.skipped} left out by {packed.ignore_file}" if packed.ignore_file else ""
        click.echo(render.visible(f"upload: {local} -> {request.upload}: {packed.files} files, "
                                  f"{format_bytes(packed.size)} ({format_bytes(packed.compressed)} packed){left_out}"),
                   err=True)
    if dry_run:  # records nothing: an operator may preview placement directly too
        api = ctx.api
        click.echo(f"valid: {request.image} with {request.resources.describe()}; would be {api.dry_run(request)}")
        return
    api = ctx.master(command)
    if packed is not None:
        with packed.file:
            task = api.submit(request, packed.file)
    else:
        task = api.submit(request)
    if as_json:
        click.echo(render.task_json(task))
    elif quiet:
        click.echo(task.task_id)
    else:
        where = f"queued on {task.worker_id}" if task.status == S.QUEUED else f"pending: {task.pending_reason}"
        if task.status.terminal:  # a dependency had already failed
            where = f"{task.status.value}: {task.error.message if task.error else ''}"
        click.echo(f"{task.task_id}  ({render.visible(where)})", err=follow)
    if follow:
        # imported once the task is on its way: the container starts while the viewer loads
        from cloudai.cli import follow as viewer

        sys.exit(viewer.monitor(api, task.task_id, header=False))


@cli.command(context_settings={"allow_interspersed_args": False})
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--cpus", help="CPU cores, such as 2 or 0.5.  [default: 1]")
@click.option("-m", "--memory", help="Memory limit, such as 512m or 4g (a bare number is bytes).  [default: 1g]")
@click.option("--gpus", help="Whole GPUs: a number, or device=ID[,ID...] for those ids of one worker.  [default: 0]")
@click.option("--shell", is_flag=True,
              help="Run COMMAND with /bin/sh -c (one argument is the whole line), through the image's entrypoint.")
@click.option("--entrypoint", help="Replace the image's ENTRYPOINT with this program ('' clears it).")
@click.option("--mount", "mounts", multiple=True, metavar="NAME[/SUB]:PATH[:ro|rw]",
              help="Mount a volume a worker offers (repeatable; `cloudai workers` lists them).")
@click.option("--output", "outputs", multiple=True, metavar="PATH",
              help="Keep this container path when the task ends (repeatable; `cloudai artifacts`, `cloudai cp`).")
@click.option("--upload", metavar="DIR[:PATH]",
              help="Pack DIR (minus its .cloudaiignore/.gitignore) into the container at PATH.  [default: /workspace]")
@click.option("--shm-size", help="Size of /dev/shm, such as 2g (counted in the memory limit).  [default: 64m]")
@click.option("-u", "--user", "container_user", metavar="UID[:GID]", help="Run the container's processes as this user.")
@click.option("--ipc", metavar="private|shareable|none", help="IPC namespace (host only where the operator allows).")
@click.option("--ulimit", "ulimits", multiple=True, metavar="NAME=SOFT[:HARD]",
              help="Resource limit such as nofile=65536 or memlock=-1 (repeatable; within the operator's bounds).")
@click.option("--storage", help="Disk quota, such as 10g (needs a storage driver that supports it).")
@click.option("-e", "--env", "env", multiple=True, metavar="KEY=VALUE", help="Environment variable (repeatable).")
@click.option("--env-file", multiple=True, type=click.Path(dir_okay=False), help="File of KEY=VALUE lines.")
@click.option("-w", "--workdir", help="Working directory inside the container.")
@click.option("-l", "--label", multiple=True, metavar="KEY=VALUE", help="Container label (repeatable).")
@click.option("--worker", help="Run on this worker (it must be registered and active).")
@click.option("--constraint", multiple=True, metavar="KEY=VALUE", help="Only on workers with this label.")
@click.option("--timeout", help="Stop the task after this long, such as 90s, 30m, 2h.")
# the values below are checked by build_request with the API's and the web form's messages, not by click
@click.option("--retries", metavar="N", help="New attempts when its worker dies.  [default: 0]")
@click.option("--priority", metavar="N", help="Higher is placed first when waiting.  [default: 0]")
@click.option("--pull", "pull_policy", metavar="missing|always|never",
              help="Image pull policy on the worker.  [default: missing]")
@click.option("--read-only", is_flag=True, help="Read-only root filesystem (/tmp stays writable, in memory).")
@click.option("--name", help="A name to recognise the task by.")
@click.option("--after", "after", multiple=True, metavar="ID[,ID...]",
              help="Start only after these tasks completed (cancelled if one ends otherwise).")
@click.option("--as-user", "as_user", envvar="CLOUDAI_USER",
              help="Owner of the task in an operator's direct mode (the master uses the token's).  [env: CLOUDAI_USER]")
@click.option("-q", "--quiet", is_flag=True, help="Print only the task id.")
@click.option("--json", "as_json", is_flag=True, help="Print the task record as JSON.")
@click.option("-f", "--follow", is_flag=True, help="Follow the log and exit with the task's exit code.")
@click.option("--dry-run", is_flag=True, help="Validate and say where it would go; record nothing.")
@pass_ctx
def submit(ctx: Context, image: str, command: tuple[str, ...], cpus: str | None, memory: str | None,
           gpus: str | None, shell: bool, entrypoint: str | None, mounts: tuple[str, ...], outputs: tuple[str, ...],
           upload: str | None, shm_size: str | None,
           container_user: str | None, ipc: str | None, ulimits: tuple[str, ...], storage: str | None,
           env: tuple[str, ...], env_file: tuple[str, ...], workdir: str | None, label: tuple[str, ...],
           worker: str | None, constraint: tuple[str, ...], timeout: str | None, retries: str | None,
           priority: str | None, pull_policy: str | None, read_only: bool, name: str | None,
           after: tuple[str, ...], as_user: str | None, quiet: bool, as_json: bool, follow: bool,
           dry_run: bool) -> None:
    """Run IMAGE on the cluster as `docker run IMAGE [COMMAND]...` runs it locally.

    Options go before IMAGE; the words after it are the container's arguments, passed to the image's
    ENTRYPOINT as docker passes them (no shell), e.g.
    `cloudai submit --cpus 2 -m 4g --gpus 1 -f pytorch/pytorch -- python train.py --epochs 3`.
    For shell syntax, ask for a shell: `--shell IMAGE 'cd /work && make; echo done'` (or `-- sh -c '...'`).
    """
    from cloudai.models import join_command
    from cloudai.submission import build_request, parse_key_values, read_env_file

    # a bad value is a ValidationError with the API's message, printed as "Error: ..." with exit 2
    args = list(command[1:] if command[:1] == ("--",) else command)
    if shell and not args:
        raise click.UsageError("--shell needs a command line after IMAGE, such as 'echo a; exit 3'")
    environment: dict[str, str] = {}
    for path in env_file:
        environment.update(read_env_file(path))
    environment.update(parse_key_values(env, "env"))
    request = build_request(
        image=image, command=join_command(args) if shell else None, args=() if shell else args, cpus=cpus,
        memory=memory, gpus=gpus, storage=storage, env=environment, workdir=workdir, labels=label,
        timeout=timeout, retries=retries, name=name, user=as_user, worker=worker, constraints=constraint,
        priority=priority, pull=pull_policy, after=after, read_only=read_only, entrypoint=entrypoint,
        mounts=mounts, shm_size=shm_size, container_user=container_user, ipc=ipc, ulimits=ulimits,
        outputs=outputs,
    )
    _submit(ctx, request, quiet, as_json, follow, dry_run, upload=upload)


SEED_OPTIONS = {"-cpu_cores": "cpus", "-mem": "memory", "-gpu_cores": "gpus"}
SEED_SHELL = ["/bin/sh", "-c"]  # the original syntax's command: a shell line, in place of the entrypoint


def seed_memory(value: str | None) -> str | None:
    """The original syntax's ``-mem`` is GB (``-mem 4.0``), unlike ``submit -m``'s bytes: a bare number gets
    its unit here; a size with a unit (``512m``) is taken as written."""
    if value is not None and re.fullmatch(r"\s*(\d+(\.\d+)?|\.\d+)\s*", value, re.ASCII):
        return value.strip() + "g"
    return value


@cli.command("task", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("worker")
@click.argument("image")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@pass_ctx
def seed_task(ctx: Context, worker: str, image: str, args: tuple[str, ...]) -> None:
    """The original syntax: run IMAGE on WORKER (same as `submit --worker`).

    \b
    cloudai task WORKER IMAGE [-cpu_cores 2.0] [-mem 4.0] [-gpu_cores 1.0] [COMMAND]...
    -cpu_cores: CPU cores (default 1.0); -mem: memory in GB or 512m/4g (default 1.0); -gpu_cores: whole GPUs.
    COMMAND is one shell line run by /bin/sh -c in place of the image's entrypoint, as this syntax always did
    (several words are quoted and joined); `submit` runs commands as `docker run` does.
    """
    from cloudai.models import join_command
    from cloudai.submission import build_request

    values: dict[str, str] = {}
    rest = list(args)
    while rest and rest[0] in SEED_OPTIONS:
        if len(rest) < 2:
            raise click.BadParameter("needs a value", param_hint=rest[0])
        values[SEED_OPTIONS[rest[0]]] = rest[1]
        rest = rest[2:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    line = join_command(rest)
    request = build_request(image=image, args=SEED_SHELL[1:] + [line] if line is not None else [],
                            entrypoint=SEED_SHELL[0] if line is not None else None, worker=worker,
                            cpus=values.get("cpus"), memory=seed_memory(values.get("memory")), gpus=values.get("gpus"))
    _submit(ctx, request, quiet=False, as_json=False, follow=False, dry_run=False, command="task")


@cli.command()
@click.argument("task_id")
@click.argument("user", required=False)
@pass_ctx
def monitor(ctx: Context, task_id: str, user: str | None) -> None:
    """Show TASK's header, its whole log live, and its final status; exit with its exit code."""
    from cloudai.cli import follow as viewer

    task = ctx.api.get(task_id)
    if user is not None and task.user_id != user:
        raise click.UsageError(f"task {task_id} belongs to user {task.user_id!r}, not {user!r}")
    sys.exit(viewer.monitor(ctx.api, task_id))


@cli.command()
@click.argument("task_id")
@click.option("-f", "--follow", is_flag=True, help="Keep following until the task ends; exit with its code.")
@click.option("--tail", type=click.IntRange(min=0), help="Start with only the last N lines.")
@click.option("-t", "--timestamps", is_flag=True, help="Show Docker's timestamp of each line.")
@click.option("--attempt", type=click.IntRange(min=1), help="Only attempt N's lines (a retried task has several).")
@pass_ctx
def logs(ctx: Context, task_id: str, follow: bool, tail: int | None, timestamps: bool, attempt: int | None) -> None:
    """Print TASK's log: from the live stream or, once it finished, the archive."""
    from cloudai.cli import follow as viewer
    from cloudai.cli import render
    from cloudai.logevents import attempt_section, lines_text

    api = ctx.api
    task = api.get(task_id)
    if attempt is not None:  # one attempt's section of the log (works the same through the API)
        if attempt > task.attempt:
            raise click.BadParameter(f"task {task_id} has attempts 1 to {task.attempt}", param_hint="--attempt")
        lines = attempt_section(api.logs(task_id), attempt)
        render.write_text(sys.stdout, lines_text(lines, timestamps))
        return
    after = 0
    if tail is not None:
        lines = [e for e in api.logs(task_id) if not isinstance(e, viewer.LogEnd)]
        after = lines[-tail].seq - 1 if 0 < tail <= len(lines) else (lines[-1].seq if lines and tail == 0 else 0)
    end = viewer.stream(api, task_id, after, timestamps=timestamps, follow=follow)
    if follow and end is not None:
        sys.exit(render.exit_code_for(end.status, end.exit_code))


@cli.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="The whole record as JSON.")
@pass_ctx
def status(ctx: Context, task_id: str, as_json: bool) -> None:
    """Show TASK's record."""
    from cloudai.cli import render

    task = ctx.api.get(task_id)
    if as_json:
        click.echo(render.task_json(task))
    else:
        render.print_status(task)


@cli.command("list")
@click.option("--user", help="Only this user's tasks ('all' for everyone).  [default: you]")
@click.option("--status", "statuses", multiple=True, type=click.Choice(STATUSES), help="Repeatable.")
@click.option("--worker", help="Only tasks placed on this worker.")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def list_tasks(ctx: Context, user: str | None, statuses: tuple[str, ...], worker: str | None, limit: int,
               as_json: bool) -> None:
    """List tasks, newest first."""
    from cloudai.cli import render
    from cloudai.models import TaskStatus as S

    who = None if user == "all" else (user or ctx.default_user())
    tasks = ctx.api.list_tasks(user=who, status=[S(s) for s in statuses], worker=worker, limit=limit)
    if as_json:
        click.echo(render.to_json([t.to_doc() for t in tasks]))
    elif not tasks:
        click.echo(render.visible(f"no tasks{' of ' + who if who else ''}"), err=True)
    else:
        render.console().print(render.task_table(tasks))


@cli.command()
@click.argument("task_ids", nargs=-1, required=True)
@click.option("--no-wait", is_flag=True, help="Don't wait for the worker to stop a running container.")
@pass_ctx
def cancel(ctx: Context, task_ids: tuple[str, ...], no_wait: bool) -> None:
    """Cancel tasks; a running one has its container stopped (SIGTERM, then SIGKILL after the grace period)."""
    from cloudai.cli import render
    from cloudai.models import TaskStatus as S

    worst = ExitCode.OK
    for task_id in task_ids:
        try:
            api = ctx.master("cancel")
            before = api.get(task_id).status
            task = api.cancel(task_id, wait_s=0 if no_wait else None)
        except CloudAIError as exc:
            click.echo(render.visible(f"{task_id}: {exc}"), err=True)
            worst = max(worst, exc.exit_code)
            continue
        if before.terminal:
            click.echo(f"{task_id}: already {before.value}")
        elif task.status == S.CANCELLED:
            click.echo(f"{task_id}: cancelled")
        elif task.status.terminal:
            click.echo(f"{task_id}: ended as {task.status.value} before the cancel took effect")
        else:
            click.echo(f"{task_id}: cancel requested; worker {task.worker_id} is stopping the container")
    sys.exit(int(worst))


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def workers(click_ctx: click.Context, as_json: bool) -> None:
    """List workers (capacity, in use, GPUs, state, heartbeat age); drain, undrain, remove."""
    from cloudai.cli import render

    if click_ctx.invoked_subcommand is not None:
        return
    views = click_ctx.find_object(Context).api.workers()  # type: ignore[union-attr]
    if as_json:
        click.echo(render.worker_json(views))
    elif not views:
        click.echo("no workers registered; start one with `cloudai worker start`", err=True)
    else:
        render.console().print(render.worker_table(views))


@workers.command()
@click.argument("worker_id")
@pass_ctx
def drain(ctx: Context, worker_id: str) -> None:
    """Stop placing new tasks on WORKER_ID; its running tasks finish."""
    from cloudai.models import WorkerState

    ctx.master("workers drain").set_worker_state(worker_id, WorkerState.DRAINING)
    click.echo(f"{worker_id}: draining")


@workers.command()
@click.argument("worker_id")
@pass_ctx
def undrain(ctx: Context, worker_id: str) -> None:
    """Place tasks on WORKER_ID again."""
    from cloudai.models import WorkerState

    ctx.master("workers undrain").set_worker_state(worker_id, WorkerState.ACTIVE)
    click.echo(f"{worker_id}: active")


@workers.command()
@click.argument("worker_id")
@click.option("--force", is_flag=True, help="Even with live tasks (they become lost).")
@pass_ctx
def remove(ctx: Context, worker_id: str, force: bool) -> None:
    """Forget WORKER_ID (it registers again if it starts)."""
    ctx.master("workers remove").remove_worker(worker_id, force)
    click.echo(f"{worker_id}: removed")


def _export(ctx: Context, **extra: str) -> None:
    """Hand this process's settings (flags included) to the Celery app, which reads the environment when
    :mod:`cloudai.celery_app` is imported: call before that import."""
    os.environ.update({"CLOUDAI_REDIS_URL": ctx.settings.redis_url, "CLOUDAI_STORE_URL": ctx.settings.store_url,
                       **extra})


@cli.group(cls=LocalGroup)
def worker() -> None:
    """Run this host as a worker."""


@worker.command("start")
@click.option("--id", "worker_id", envvar="CLOUDAI_WORKER_ID", help="Worker id and queue.  [default: hostname]")
@click.option("--cpus", envvar="CLOUDAI_WORKER_CPUS", help="CPUs to offer.  [default: all]")
@click.option("--memory", envvar="CLOUDAI_WORKER_MEMORY", help="Memory to offer, such as 32g.  [default: all]")
@click.option("--gpus", envvar="CLOUDAI_WORKER_GPUS", default="auto", show_default=True,
              help="auto (NVML / nvidia-smi), none, or ids such as 0,1.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Worker label for --constraint.")
@click.option("--volume", "volumes", multiple=True, metavar="NAME=HOSTPATH[:ro|rw]",
              help="Offer this directory to tasks as volume NAME (repeatable; read-only unless :rw; {user} in the "
                   "path gives each user their own directory).  [env: CLOUDAI_WORKER_VOLUMES]")
@click.option("--concurrency", envvar="CLOUDAI_WORKER_CONCURRENCY", type=click.IntRange(1, 1024), default=16,
              show_default=True, help="Tasks run at once (placement keeps them within capacity).")
@click.option("--loglevel", default="INFO", show_default=True)
@pass_ctx
def worker_start(ctx: Context, worker_id: str | None, cpus: str | None, memory: str | None, gpus: str,
                 labels: tuple[str, ...], volumes: tuple[str, ...], concurrency: int, loglevel: str) -> None:
    """Run a Celery worker in the foreground that consumes only this worker's queue."""
    from cloudai import limits
    from cloudai.agent import host_capacity

    worker_id = worker_id or ctx.settings.worker_id
    _parse(limits.worker_id, worker_id, "worker id", param="--id")
    label_text = ",".join(labels) or os.environ.get("CLOUDAI_WORKER_LABELS", "")
    volume_text = ",".join(volumes) or ctx.settings.worker_volumes
    try:  # fail here, before Celery starts
        host_capacity(cpus or "", memory or "", gpus, label_text, volumes=volume_text)
    except CloudAIError as exc:
        raise click.UsageError(str(exc)) from exc
    # the worker process reads these through Settings.from_env()
    _export(ctx, CLOUDAI_WORKER_ID=worker_id, CLOUDAI_WORKER_CPUS=cpus or "", CLOUDAI_WORKER_MEMORY=memory or "",
            CLOUDAI_WORKER_GPUS=gpus, CLOUDAI_WORKER_LABELS=label_text, CLOUDAI_WORKER_VOLUMES=volume_text,
            CLOUDAI_WORKER_CONCURRENCY=str(concurrency))  # its slots: part of the capacity placement counts
    from cloudai import keys
    from cloudai.celery_app import run_worker
    from cloudai.workers import bootstrap

    bootstrap.current()  # store, Redis and Docker errors show here, before Celery starts
    run_worker(["-Q", f"{keys.worker_queue(worker_id)},{keys.MAINTENANCE_QUEUE}", "-n", f"{worker_id}@%h",
                "--pool", "threads", "-c", str(concurrency), "-E", "--without-gossip", "--without-mingle",
                "--loglevel", loglevel])


@cli.command(cls=LocalCommand)
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--schedule", default=os.path.join(os.path.expanduser("~"), ".cache", "cloudai-beat-schedule"),
              show_default=True, help="Where beat keeps its schedule state.")
@pass_ctx
def beat(ctx: Context, loglevel: str, schedule: str) -> None:
    """Run beat with the maintenance consumer: dead workers, lost tasks, pending placement, log retention."""
    os.makedirs(os.path.dirname(schedule), exist_ok=True)
    _export(ctx, CLOUDAI_AGENT="0")
    from cloudai import keys
    from cloudai.celery_app import run_worker

    run_worker(["-B", "-s", schedule, "-Q", keys.MAINTENANCE_QUEUE, "-n", "beat@%h", "--pool", "solo", "-E",
                "--without-gossip", "--without-mingle", "--loglevel", loglevel])


@cli.command(cls=LocalCommand, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--port", default=5555, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Interface to listen on (0.0.0.0: all; put TLS in front of it).")
@click.option("--basic-auth", envvar="FLOWER_BASIC_AUTH",
              help="user:password[,user:password]  [env: FLOWER_BASIC_AUTH]")
@click.option("--no-auth", is_flag=True, help="Run without authentication (only on a trusted network).")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
@pass_ctx
def flower(ctx: Context, port: int, address: str, basic_auth: str | None, no_auth: bool,
           flower_args: tuple[str, ...]) -> None:
    """Run the Flower dashboard for this cluster (it can revoke tasks: never run it open by accident)."""
    other_auth = bool(os.environ.get("FLOWER_AUTH")) or any(  # Flower's own OAuth options
        a.startswith(("--auth", "--basic-auth", "--basic_auth")) for a in flower_args)
    if basic_auth:
        pairs = basic_auth.split(",")
        if not all(user and password for user, _, password in (p.partition(":") for p in pairs)):
            raise click.BadParameter("use user:password (several separated by commas), both non-empty",
                                     param_hint="--basic-auth / FLOWER_BASIC_AUTH")
    elif not no_auth and not other_auth:
        raise click.UsageError("Flower would start without authentication. Set FLOWER_BASIC_AUTH=user:password "
                               "(or --basic-auth), or pass --no-auth to run it open on purpose.")
    if no_auth and not basic_auth and not other_auth and address not in ("127.0.0.1", "localhost", "::1"):
        click.echo(click.style("Warning: ", fg="yellow", bold=True)
                   + f"Flower listens on {address} without authentication: anyone who reaches it can revoke tasks.",
                   err=True)
    _export(ctx, CLOUDAI_AGENT="0")
    from cloudai.celery_app import run_celery

    args = ["flower", f"--port={port}", f"--address={address}", *flower_args]
    if basic_auth:
        args.append(f"--basic-auth={basic_auth}")
    run_celery(args)


from cloudai.cli.admin import admin  # noqa: E402  (commands defined beside this module)
from cloudai.cli.identity import login, logout, server, whoami  # noqa: E402

for _command in (admin, login, logout, whoami, server):
    cli.add_command(_command)
quota_cli.register(cli, Context, pass_ctx)
artifacts_cli.register(cli, pass_ctx)
cmdserver_cli.register(cli)


def main() -> None:
    """The ``cloudai`` console script (a client command ends quickly: :mod:`cloudai.cli.shutdown`)."""
    plan = ExitPlan()
    try:
        cli.main(prog_name="cloudai", obj=plan)
    except SystemExit as exc:
        if not plan.fast:
            raise
        exit_now(exc.code)


if __name__ == "__main__":
    main()
