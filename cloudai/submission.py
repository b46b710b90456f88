"""A task as a user asks for it, and the parsing of ``KEY=VALUE`` options. Light (no Redis, Docker or store
imports): the CLI builds and validates requests here in both modes, and the master validates API bodies with
the same code, so the messages are the same everywhere."""

from __future__ import annotations

from dataclasses import dataclass, field

from cloudai.errors import ValidationError
from cloudai.models import Resources

PULL_POLICIES = ("missing", "always", "never")
_ENV_KEY_FORMS = "use KEY=VALUE with KEY made of letters, digits and _ (not starting with a digit)"


@dataclass
class SubmitRequest:
    """A task as a user asks for it (already parsed from strings)."""

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

    def validate(self) -> None:
        if not self.image or any(c.isspace() for c in self.image):
            raise ValidationError("image", self.image, "name an image such as busybox or ghcr.io/org/app:1.2")
        if self.retries < 0 or self.retries > 100:
            raise ValidationError("retries", self.retries, "use a whole number from 0 to 100")
        if self.pull_policy not in PULL_POLICIES:
            raise ValidationError("pull policy", self.pull_policy, f"use one of {', '.join(PULL_POLICIES)}")
        for key in self.env:
            if not key or not (key[0].isalpha() or key[0] == "_") or not all(c.isalnum() or c == "_" for c in key):
                raise ValidationError("env", key, _ENV_KEY_FORMS)
        if self.workdir is not None and not self.workdir.startswith("/"):
            raise ValidationError("workdir", self.workdir, "use an absolute path inside the container, such as /work")


def parse_key_values(items: list[str] | tuple[str, ...], what: str) -> dict[str, str]:
    """``KEY=VALUE`` pairs (``--env``, ``--label``, ``--constraint``) into a dict; the last one wins."""
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
    return parse_key_values([ln for ln in lines if ln and not ln.startswith("#")], "env-file line")
