"""The one interface the user commands talk to, with two implementations chosen once per process: the master's
API (:class:`cloudai.cli.remote.RemoteCloud`, over HTTP: every command) and direct mode (:class:`cloudai.api.CloudAI`
on Redis and the store, without a dispatcher: the operators' read-only view). Also the credentials file that
``cloudai login`` writes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO, Protocol

from cloudai.artifacts.base import Artifact
from cloudai.errors import ConfigError
from cloudai.logevents import LogEvent
from cloudai.models import Quota, Task, TaskStatus, WorkerInfo, WorkerState
from cloudai.settings import Settings
from cloudai.submission import SubmitRequest
from cloudai.workerview import WorkerView


class Client(Protocol):
    """What the CLI's user commands call."""

    def submit(self, request: SubmitRequest, upload: BinaryIO | None = None) -> Task: ...
    def dry_run(self, request: SubmitRequest) -> str: ...
    def get(self, task_id: str) -> Task: ...
    def list_tasks(self, user: str | None = None, status: list[TaskStatus] | None = None,
                   worker: str | None = None, limit: int = 50) -> list[Task]: ...
    def cancel(self, task_id: str, by: str | None = None, wait_s: float | None = None) -> Task: ...
    def follow_batches(self, task_id: str, after_seq: int = 0, follow: bool = True,
                       on_reconnect: Callable[[Exception], None] | None = None,
                       reconnect_for_s: float = 60.0, timestamps: bool = True) -> Iterator[Sequence[LogEvent]]: ...
    def logs(self, task_id: str) -> Iterator[LogEvent]: ...
    def workers(self) -> list[WorkerView]: ...
    def set_worker_state(self, worker_id: str, state: WorkerState) -> WorkerInfo: ...
    def remove_worker(self, worker_id: str, force: bool = False) -> None: ...
    def quota_usage(self, user: str | None = None) -> tuple[Quota | None, dict[str, float]]: ...
    def artifacts(self, task_id: str) -> list[Artifact]: ...
    def open_artifact(self, task_id: str, path: str, offset: int = 0, sha256: str | None = None
                      ) -> AbstractContextManager[tuple[Artifact, int, Iterator[bytes]]]: ...
    def delete_artifacts(self, task_id: str) -> int: ...


def credentials_path() -> Path:
    """``$XDG_CONFIG_HOME/cloudai/credentials.json`` (default ``~/.config``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "cloudai" / "credentials.json"


def read_credentials() -> dict[str, str]:
    path = credentials_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"can't read {path} ({exc}); run `cloudai login URL` again") from None
    return {k: str(v) for k, v in data.items() if k in ("url", "token") and v}


def write_credentials(url: str, token: str) -> Path:
    """Write the file readable by its owner only (0600), replacing it atomically."""
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"url": url, "token": token}, fh)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def api_target(settings: Settings) -> tuple[str, str | None] | None:
    """``(url, token)`` when the CLI should use the API: ``CLOUDAI_API_URL`` (token from ``CLOUDAI_TOKEN`` or,
    for the same URL, the login file), else the URL ``cloudai login`` saved; None for direct mode."""
    saved = read_credentials()
    url = settings.api_url or saved.get("url")
    if not url:
        return None
    url = url.rstrip("/")
    token = settings.token or (saved.get("token") if saved.get("url", "").rstrip("/") == url else None)
    return url, token


def open_client(settings: Settings) -> Client:
    """The client for this process: the API when configured, else the cluster's read-only direct view (redis-py
    and the store: an operator's tools on the cluster network, which a client-only install lacks)."""
    target = api_target(settings)
    if target is not None:
        from cloudai.cli.remote import RemoteCloud

        return RemoteCloud(*target)
    try:
        from cloudai.api import CloudAI
    except ImportError as exc:  # `pip install cloudai` without the worker or server extra
        raise ConfigError(f"no CloudAI master configured, and direct mode needs `pip install cloudai[all]` "
                          f"({exc}); set CLOUDAI_API_URL or run `cloudai login URL`") from None
    return CloudAI(settings)
