"""Request bodies. Unknown fields and values of the wrong JSON type are refused (422); every bound is checked by
the same function the CLI and the web form go through (:func:`cloudai.submission.build_request`, with the
bounds of :mod:`cloudai.limits`), so a bad value gets the CLI's message. The bounds shown in the schema
(``/docs``) are derived from :mod:`cloudai.limits` too: documented here, enforced there, never a second number."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from cloudai import limits, runoptions, volumes
from cloudai.outputs import MAX_OUTPUTS
from cloudai.submission import SubmitRequest, build_request

Number = StrictStr | StrictInt | StrictFloat  # true/false are not numbers (JSON booleans are refused)
Pairs = dict[str, str] | list[str]  # an object, or KEY=VALUE lines as `docker run -e` and the web form give them


def _kib(size: int) -> str:
    return f"{round(size / limits.KiB)} KiB"


class SubmitBody(BaseModel):
    """A task to run: what ``cloudai submit`` takes, as JSON. ``user`` is accepted and ignored: a task belongs
    to the token's user. The ``json_schema_extra`` bounds are documentation (pydantic shows them, doesn't
    check them); :func:`build_request` checks them, with the CLI's messages."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="a Docker image reference",
                       json_schema_extra={"maxLength": limits.MAX_IMAGE_CHARS})
    command: StrictStr | list[StrictStr] | None = Field(
        None, description="a list: the container's arguments, passed to the image's entrypoint as `docker run IMAGE "
        f"ARG...` passes them (at most {limits.MAX_ARGS}, {_kib(limits.MAX_ARGS_TOTAL_BYTES)} in all); a string: one "
        f"shell line run as `/bin/sh -c LINE` (at most {_kib(limits.MAX_COMMAND_BYTES)})",
        json_schema_extra={"maxItems": limits.MAX_ARGS})
    entrypoint: str | None = Field(None, description="replaces the image's ENTRYPOINT ('' clears it)")
    mounts: list[str] = Field(default_factory=list, description="volumes a worker offers: "
                              "NAME[/SUBPATH]:CONTAINERPATH[:ro|rw]",
                              json_schema_extra={"maxItems": volumes.MAX_MOUNTS})
    shm_size: Number | None = Field(None, description="bytes of /dev/shm, or a size such as 2g (within memory)")
    container_user: str | None = Field(None, description="UID[:GID] the container's processes run as (docker -u)")
    ipc: str | None = Field(None, description="private, shareable or none (host where the operator allows it)")
    ulimits: list[str] = Field(default_factory=list, description="NAME=SOFT[:HARD], within the operator's bounds",
                               json_schema_extra={"maxItems": runoptions.MAX_ULIMITS})
    cpus: Number | None = Field(None, description="CPU cores, such as 2 or 0.5",
                                json_schema_extra={"maximum": limits.MAX_CPUS})
    memory: Number | None = Field(
        None, description="bytes, or a size such as 512m or 4g (k/m/g/t are powers of 1024); at least 6m",
        json_schema_extra={"minimum": limits.MIN_MEMORY_BYTES, "maximum": limits.MAX_MEMORY_BYTES})
    gpus: Number | None = Field(None, description="whole GPUs, or device=ID[,ID...] for those ids of one worker",
                                json_schema_extra={"minimum": 0, "maximum": limits.MAX_GPUS})
    storage: Number | None = Field(None, description="bytes, or a size such as 10g",
                                   json_schema_extra={"maximum": limits.MAX_MEMORY_BYTES})
    env: Pairs = Field(
        default_factory=dict,
        description=f"at most {limits.MAX_ENV_ENTRIES} variables, {_kib(limits.MAX_ENV_VALUE_BYTES)} per value, "
                    f"{_kib(limits.MAX_ENV_TOTAL_BYTES)} in all",
        json_schema_extra={"maxProperties": limits.MAX_ENV_ENTRIES, "maxItems": limits.MAX_ENV_ENTRIES})
    workdir: str | None = Field(None, description="an absolute path in the container",
                                json_schema_extra={"maxLength": limits.MAX_WORKDIR_CHARS})
    labels: Pairs = Field(
        default_factory=dict,
        description=f"container labels; keys starting with {limits.RESERVED_LABEL_PREFIX!r} are CloudAI's own",
        json_schema_extra={"maxProperties": limits.MAX_LABELS, "maxItems": limits.MAX_LABELS})
    timeout: Number | None = Field(None, description="seconds, or such as 30m, 2h; 0: no limit",
                                   json_schema_extra={"minimum": 0, "maximum": limits.MAX_TIMEOUT_S})
    retries: Number | None = Field(None, description="new attempts when its worker dies",
                                   json_schema_extra={"minimum": 0, "maximum": limits.MAX_RETRIES})
    name: str | None = Field(None, description="a name to recognise the task by",
                             json_schema_extra={"maxLength": limits.MAX_NAME_CHARS})
    worker: str | None = Field(None, description="run on this worker",
                               json_schema_extra={"maxLength": limits.MAX_ID_CHARS})
    constraints: Pairs = Field(default_factory=dict, description="worker labels the task needs",
                               json_schema_extra={"maxProperties": limits.MAX_LABELS, "maxItems": limits.MAX_LABELS})
    priority: Number | None = Field(None, description="higher is placed first when waiting",
                                    json_schema_extra={"minimum": -limits.MAX_PRIORITY,
                                                       "maximum": limits.MAX_PRIORITY})
    pull: str | None = Field(None, description="image pull policy: missing (default), always or never")
    read_only: bool = Field(default=False, description="read-only root filesystem (/tmp stays writable)")
    after: list[str] = Field(default_factory=list,
                             description="task ids (yours) that must complete before this one starts",
                             json_schema_extra={"maxItems": limits.MAX_DEPENDENCIES})
    outputs: list[str] = Field(default_factory=list,
                               description="container paths copied into the artifact store when the container ends "
                               "(`GET /v1/tasks/{id}/artifacts`)", json_schema_extra={"maxItems": MAX_OUTPUTS})
    upload: str | None = Field(None, description="where the tar.gz sent as the multipart part `upload` is placed in "
                               "the container (default /workspace; also the working directory unless `workdir`)")
    user: str | None = Field(default=None, description="ignored: the token's user owns the task")

    def to_request(self, user: str) -> SubmitRequest:
        """The library's request, owned by ``user``; raises the CLI's :class:`ValidationError`."""
        shell = self.command if isinstance(self.command, str) else None
        return build_request(
            image=self.image, command=shell, args=self.command if isinstance(self.command, list) else (),
            entrypoint=self.entrypoint, mounts=self.mounts, shm_size=self.shm_size,
            container_user=self.container_user, ipc=self.ipc, ulimits=self.ulimits, cpus=self.cpus,
            memory=self.memory, gpus=self.gpus,
            storage=self.storage, env=self.env, workdir=self.workdir, labels=self.labels, timeout=self.timeout,
            retries=self.retries, name=self.name, user=user, worker=self.worker, constraints=self.constraints,
            priority=self.priority, pull=self.pull, after=self.after, read_only=self.read_only,
            outputs=self.outputs, upload=self.upload,
        )
