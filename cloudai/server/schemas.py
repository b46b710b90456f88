"""Request bodies. Unknown fields are refused (422); values are parsed by the same functions the CLI uses
(``Resources.parse``, ``parse_duration``, ``SubmitRequest.validate``), so their messages are the CLI's."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from cloudai.api import SubmitRequest
from cloudai.models import Resources, parse_duration

Number = StrictStr | StrictInt | StrictFloat  # true/false are not numbers (JSON booleans are refused)


class SubmitBody(BaseModel):
    """A task to run: what ``cloudai submit`` takes, as JSON. ``user`` is accepted and ignored: a task belongs
    to the token's user."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(max_length=1024)
    command: str | None = Field(default=None, max_length=256 * 1024)
    cpus: Number | None = None
    memory: Number | None = None
    gpus: Number | None = None
    storage: Number | None = None
    env: dict[str, str] = Field(default_factory=dict, max_length=256)
    workdir: str | None = Field(default=None, max_length=4096)
    labels: dict[str, str] = Field(default_factory=dict, max_length=256)
    timeout: Number | None = None
    retries: int = 0
    name: str | None = Field(default=None, max_length=256)
    worker: str | None = Field(default=None, max_length=256)
    constraints: dict[str, str] = Field(default_factory=dict, max_length=256)
    priority: int = 0
    pull: str = "missing"
    read_only: bool = Field(default=False, description="read-only root filesystem (/tmp stays writable)")
    after: list[str] = Field(default_factory=list, max_length=100,
                             description="task ids (yours) that must complete before this one starts")
    user: str | None = Field(default=None, max_length=256, description="ignored: the token's user owns the task")

    def to_request(self, user: str) -> SubmitRequest:
        """The library's request, owned by ``user``; raises the CLI's :class:`ValidationError`."""
        request = SubmitRequest(
            image=self.image, command=self.command,
            resources=Resources.parse(_text(self.cpus), _text(self.memory), _text(self.gpus), _text(self.storage)),
            env=dict(self.env), workdir=self.workdir, labels=dict(self.labels),
            timeout_s=parse_duration(self.timeout), retries=self.retries, name=self.name, user=user,
            worker=self.worker, constraints=dict(self.constraints), priority=self.priority, pull_policy=self.pull,
            after=list(self.after), read_only=self.read_only,
        )
        request.validate()
        return request


def _text(value: Number | None) -> str | None:
    """Numbers as the CLI would have received them (a bare memory number means GB in both)."""
    return None if value is None else str(value)
