"""A task as a user asks for it, and the parsing of what users type into one. Light (no Redis, Docker or store
imports): the CLI's options, the API's JSON body and the web form's fields all become a request through
:func:`build_request`, checked against :mod:`cloudai.limits` by :meth:`SubmitRequest.validate`, so the same
bad value gets the same message everywhere."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cloudai import limits, runoptions, volumes
from cloudai.errors import ValidationError
from cloudai.models import Resources, format_bytes, parse_duration, parse_size, parse_whole
from cloudai.outputs import parse_outputs
from cloudai.uploads import container_path

PULL_POLICIES = ("missing", "always", "never")


@dataclass
class SubmitRequest:
    """A task as a user asks for it (already parsed from strings). The container's command is ``args`` (its
    arguments, as ``docker run IMAGE ARG...`` passes them) or ``command``, one shell line run as
    ``/bin/sh -c LINE`` (``--shell``; the API's ``command`` given as a string): never both
    (:mod:`cloudai.runoptions` states the rule)."""

    image: str
    command: str | None = None
    resources: Resources = field(default_factory=Resources)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    timeout_s: float | None = None
    retries: int = 0
    name: str | None = None
    user: str | None = None
    worker: str | None = None
    constraints: dict[str, str] = field(default_factory=dict)
    priority: int = 0
    pull_policy: str = "missing"
    after: list[str] = field(default_factory=list)  # task ids that must complete first
    read_only: bool = False  # read-only root filesystem (a writable tmpfs on /tmp)
    args: list[str] = field(default_factory=list)
    entrypoint: str | None = None  # replaces the image's ENTRYPOINT ('' clears it)
    mounts: list[str] = field(default_factory=list)  # NAME[/SUBPATH]:CONTAINERPATH[:ro|rw] (cloudai.volumes)
    shm_size: int | None = None  # bytes of /dev/shm
    container_user: str | None = None  # UID[:GID] or NAME[:GROUP] (docker run -u)
    ipc: str | None = None
    ulimits: list[str] = field(default_factory=list)  # NAME=SOFT[:HARD]
    gpu_devices: list[str] = field(default_factory=list)  # --gpus device=ID,...
    outputs: list[str] = field(default_factory=list)  # container paths copied out when it ends (cloudai.outputs)
    upload: str | None = None  # where an uploaded directory goes in the container (cloudai.uploads)

    def run_args(self) -> list[str]:
        """The container's arguments: ``args``, or ``/bin/sh -c COMMAND`` for a shell line."""
        if self.command is not None:
            return runoptions.shell_args(self.command)
        return list(self.args)

    def validate(self) -> None:
        """Every field within the bounds of :mod:`cloudai.limits`; raises :class:`ValidationError` naming the
        field, the bound and what to use instead. Nothing is recorded before this passes."""
        limits.image(self.image)
        if self.command is not None:
            limits.text("command", self.command, max_bytes=limits.MAX_COMMAND_BYTES, controls=True)
            if self.args:
                raise ValidationError("command", self.command, "give the command as arguments or as one shell "
                                      "line (--shell), not both")
        limits.args(self.args)
        if self.entrypoint is not None:
            limits.text("entrypoint", self.entrypoint, max_chars=limits.MAX_WORKDIR_CHARS)
        self.mounts = [m.spec for m in volumes.parse_mounts(self.mounts)]
        self.outputs = parse_outputs(self.outputs)
        if self.upload is not None:
            self.upload = container_path(self.upload)
        if self.shm_size is not None and self.shm_size > self.resources.memory:
            raise ValidationError("shm-size", format_bytes(self.shm_size),
                                  f"/dev/shm counts against the memory limit ({format_bytes(self.resources.memory)}); "
                                  "raise -m or lower --shm-size")
        if self.container_user is not None:
            runoptions.container_user(self.container_user)
        if self.ipc is not None:
            runoptions.ipc_mode(self.ipc)
        if len(self.ulimits) > runoptions.MAX_ULIMITS:
            raise ValidationError("ulimit", f"{len(self.ulimits)} limits", f"the most is {runoptions.MAX_ULIMITS}")
        self.ulimits = [u.spec for u in runoptions.parse_ulimits(self.ulimits)]
        if self.gpu_devices:
            if len(self.gpu_devices) > limits.MAX_GPUS:
                raise ValidationError("gpus", f"{len(self.gpu_devices)} devices", f"the most is {limits.MAX_GPUS}")
            if not all(runoptions.GPU_ID_RE.fullmatch(g) for g in self.gpu_devices) or \
                    len(set(self.gpu_devices)) != len(self.gpu_devices):
                raise ValidationError("gpus", ",".join(self.gpu_devices), runoptions.GPU_FORMS)
            if self.resources.gpus != len(self.gpu_devices):
                raise ValidationError("gpus", self.resources.gpus, "device=ID,... asks for exactly those GPUs")
        limits.whole("retries", self.retries, 0, limits.MAX_RETRIES)
        limits.whole("priority", self.priority, -limits.MAX_PRIORITY, limits.MAX_PRIORITY)
        if self.pull_policy not in PULL_POLICIES:
            raise ValidationError("pull policy", self.pull_policy, f"use one of {', '.join(PULL_POLICIES)}")
        limits.env(self.env)
        limits.key_values("label", self.labels, reserved_prefix=limits.RESERVED_LABEL_PREFIX)
        limits.key_values("constraint", self.constraints)
        if self.workdir is not None:
            limits.text("workdir", self.workdir, max_chars=limits.MAX_WORKDIR_CHARS)
            if not self.workdir.startswith("/"):
                raise ValidationError("workdir", self.workdir,
                                      "use an absolute path inside the container, such as /work")
        if self.name is not None:
            limits.text("name", self.name, max_chars=limits.MAX_NAME_CHARS)
        if self.user is not None:
            limits.user_id(self.user)
        if self.worker is not None:
            limits.worker_id(self.worker)
        if len(self.after) > limits.MAX_DEPENDENCIES:
            raise ValidationError("after", f"{len(self.after)} tasks",
                                  f"a task may wait for at most {limits.MAX_DEPENDENCIES} others")
        for dep in self.after:
            limits.text("after", dep, max_chars=limits.MAX_ID_CHARS)


Typed = str | int | float  # a value as typed (CLI, web form) or as a JSON number (API)
Pairs = Mapping[str, str] | Iterable[str]  # a JSON object, or KEY=VALUE lines (-e options, a form's textarea)


def build_request(*, image: str, command: str | None = None, cpus: Typed | None = None,
                  memory: Typed | None = None, gpus: Typed | None = None, storage: Typed | None = None,
                  env: Pairs = (), workdir: str | None = None, labels: Pairs = (), timeout: Typed | None = None,
                  retries: Typed | None = None, name: str | None = None, user: str | None = None,
                  worker: str | None = None, constraints: Pairs = (), priority: Typed | None = None,
                  pull: str | None = None, after: Iterable[str] = (), read_only: bool = False,
                  args: Iterable[str] = (), entrypoint: str | None = None, mounts: Iterable[str] = (),
                  shm_size: Typed | None = None, container_user: str | None = None, ipc: str | None = None,
                  ulimits: Iterable[str] = (), outputs: Iterable[str] = (),
                  upload: str | None = None) -> SubmitRequest:
    """A validated request from what a user gave, in any entry point's form: numbers as text or JSON numbers
    (a number is read as its text, so ``512`` and ``"512"`` are the same value with the same message),
    pairs as an object or ``KEY=VALUE`` lines. ``gpus`` is a count or ``device=ID,...``. Raises
    :class:`ValidationError` naming the field, the bound and what to use instead; ``None`` keeps a default."""
    devices = runoptions.gpu_devices(gpus) if isinstance(gpus, str) else None
    if devices is not None:
        gpus = len(devices)
    request = SubmitRequest(
        image=image,
        command=command,
        resources=Resources.parse(_text(cpus), _text(memory), _text(gpus), _text(storage)),
        env=_pairs(env, "env"),
        workdir=workdir,
        labels=_pairs(labels, "label"),
        timeout_s=parse_duration(_text(timeout)),
        retries=0 if retries is None else parse_whole("retries", str(retries), 0, limits.MAX_RETRIES),
        name=name,
        user=user,
        worker=worker,
        constraints=_pairs(constraints, "constraint"),
        priority=0 if priority is None else parse_whole("priority", str(priority), -limits.MAX_PRIORITY,
                                                         limits.MAX_PRIORITY),
        pull_policy="missing" if pull is None else pull,
        after=[i.strip() for item in after for i in item.split(",") if i.strip()],
        read_only=read_only,
        args=limits.args(args if isinstance(args, list | tuple) else list(args)),
        entrypoint=entrypoint,
        mounts=_strings(mounts, "mount"),
        shm_size=None if shm_size is None else parse_size(_text(shm_size) or "", "shm-size"),
        container_user=container_user,
        ipc=ipc,
        ulimits=_strings(ulimits, "ulimit"),
        gpu_devices=devices or [],
        outputs=_strings(outputs, "output"),
        upload=upload,
    )
    request.validate()
    return request


def _strings(items: Iterable[str], what: str) -> list[str]:
    """Repeatable text values (``--mount``, ``--ulimit``, ``--output``); one string is one value, not its
    characters."""
    if isinstance(items, str):
        return [items]
    values = list(items)
    for value in values:
        if not isinstance(value, str):
            raise ValidationError(what, value, "must be text")
    return values


def _text(value: Typed | None) -> str | None:
    """A number as the CLI would have received it."""
    return value if value is None or isinstance(value, str) else str(value)


def _pairs(pairs: Pairs, what: str) -> dict[str, str]:
    if isinstance(pairs, Mapping):
        return dict(pairs)
    if isinstance(pairs, str):  # one string is one pair, not its characters
        pairs = [pairs]
    return parse_key_values(list(pairs), what)


def parse_key_values(items: list[str] | tuple[str, ...], what: str) -> dict[str, str]:
    """``KEY=VALUE`` pairs (``--env``, ``--label``, ``--constraint``) into a dict. A repeated key: the last one
    wins, as with ``docker run -e`` (so a later ``-e`` overrides an ``--env-file`` default)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValidationError(what, item, "use KEY=VALUE")
        out[key.strip()] = value
    return out


def read_env_file(path: str) -> dict[str, str]:
    """A ``docker run --env-file`` file: ``KEY=VALUE`` lines, ``#`` comments and blank lines ignored."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [ln.strip() for ln in fh]
    except OSError as exc:
        raise ValidationError("env-file", path, f"could not be read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ValidationError("env-file", path, f"is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    return parse_key_values([ln for ln in lines if ln and not ln.startswith("#")], "env-file line")
