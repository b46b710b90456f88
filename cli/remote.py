"""The CLI's client of the master's HTTP API (``CLOUDAI_API_URL``): the same operations as
:class:`cloudai.api.CloudAI`, over HTTP, so every command prints and exits the same in both modes. Imports no
Redis, Docker, Celery or store code."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, BinaryIO

from cloudai.artifacts.base import Artifact
from cloudai.cli.lean_httpx import httpx
from cloudai.errors import CloudAIError, ExitCode, ServiceUnavailable, redact
from cloudai.logevents import LineBatch, LogEnd, LogEvent, fit_column
from cloudai.models import Quota, Task, TaskStatus, WorkerInfo, WorkerState
from cloudai.submission import SubmitRequest
from cloudai.workerview import WorkerView


class ApiUnavailable(ServiceUnavailable):
    def __init__(self, url: str, reason: object) -> None:
        super().__init__(f"the CloudAI server at {redact(url)} can't be reached: {reason or type(reason).__name__}. "
                         "Is `cloudai server` running there? Check CLOUDAI_API_URL (or run `cloudai login URL`).")


class ApiError(CloudAIError):
    """An error the server answered with; carries the exit code the CLI would have used in direct mode."""

    def __init__(self, status: int, kind: str, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.exit_code = ExitCode(exit_code) if exit_code in {code.value for code in ExitCode} else ExitCode.ERROR


def _api_error(response: httpx.Response) -> ApiError:
    try:
        err = response.json()["error"]
        return ApiError(response.status_code, str(err["type"]), str(err["message"]),
                        int(err.get("exit_code", ExitCode.ERROR)))
    except (ValueError, KeyError, TypeError):
        code = ExitCode.NOT_FOUND if response.status_code == 404 else ExitCode.ERROR
        return ApiError(response.status_code, "HTTPError", f"the server answered {response.status_code} "
                        f"{response.reason_phrase} (is {redact(str(response.url))} a CloudAI server?)", code)


class SSEvent:
    __slots__ = ("kind", "id", "data")

    def __init__(self, kind: str, event_id: str | None, data: list[str]) -> None:
        self.kind = kind
        self.id = event_id
        self.data = data


def parse_sse(chunks: Iterable[bytes]) -> Iterator[SSEvent]:
    """Server-Sent Events from a byte stream; a comment (keep-alive) is an event of kind ``comment``. Lines
    split on ``\\n`` only: a log line may hold other characters that ``str.splitlines`` would split on."""
    pending: list[bytes] = []  # the start of a line that no read has ended yet
    kind, event_id, data = "message", None, []  # type: str, str | None, list[str]
    for chunk in chunks:
        cut = chunk.rfind(b"\n")
        if cut < 0:  # no line ends here: keep the read, not a growing copy (an event of 10,000 lines is ~0.5 MB,
            pending.append(chunk)  # which a TLS connection delivers in 16 KiB reads)
            continue
        pending.append(chunk[:cut])
        complete = b"".join(pending)
        pending = [chunk[cut + 1:]]
        # decoded once per read, split after: b"\n" never occurs inside a UTF-8 sequence, so this is the same as
        # splitting the bytes first (a log of 100k lines is 100k data fields)
        for line in complete.decode("utf-8", "replace").split("\n"):
            line = line.removesuffix("\r")
            if line.startswith("data: "):  # most fields by far
                data.append(line[6:])
                continue
            if not line:
                if data or kind != "message":
                    yield SSEvent(kind, event_id, data)
                kind, event_id, data = "message", None, []
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "":
                yield SSEvent("comment", None, [value])
            elif name == "data":
                data.append(value)
            elif name == "id":
                event_id = value
            elif name == "event":
                kind = value


class RemoteCloud:
    """The master's API as the CLI uses it."""

    def __init__(self, url: str, token: str | None, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # TLS settings only for an https URL: httpx loads the CA bundle when a client is made (~45 ms a command),
        # and a plain-HTTP master (the default, on a trusted network) has no certificate to check
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout_s, connect=5.0),
                                  verify=self.url.startswith("https://"))

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiUnavailable(self.url, exc) from None
        if response.status_code >= 400:
            raise _api_error(response)
        return response.json()

    # -- identity ---------------------------------------------------------------------------------------
    def whoami(self) -> dict[str, Any]:
        return self._call("GET", "/v1/whoami")  # type: ignore[no-any-return]

    def default_user(self) -> str:
        return str(self.whoami()["user"])

    # -- tasks ------------------------------------------------------------------------------------------
    @staticmethod
    def _body(request: SubmitRequest) -> dict[str, Any]:
        res = request.resources
        return {
            # a string command is a shell line, a list the container's arguments (cloudai.runoptions)
            "image": request.image, "command": request.command if request.command is not None else request.args,
            "entrypoint": request.entrypoint, "mounts": request.mounts, "shm_size": request.shm_size,
            "container_user": request.container_user, "ipc": request.ipc, "ulimits": request.ulimits,
            "cpus": res.cpus, "memory": res.memory, "storage": res.storage, "env": request.env,
            "gpus": f"device={','.join(request.gpu_devices)}" if request.gpu_devices else res.gpus,
            "workdir": request.workdir, "labels": request.labels, "timeout": request.timeout_s,
            "retries": request.retries, "name": request.name, "worker": request.worker,
            "constraints": request.constraints, "priority": request.priority, "pull": request.pull_policy,
            "after": request.after, "read_only": request.read_only, "outputs": request.outputs,
            "upload": request.upload,
        }

    def submit(self, request: SubmitRequest, upload: BinaryIO | None = None) -> Task:
        """Submit; with ``upload`` (a packed directory, a tar.gz) as a multipart form: the task's JSON as the field
        ``spec``, the archive as the file ``upload`` (streamed from the file, never in memory whole)."""
        request.validate()
        if upload is None:
            return Task.from_doc(self._call("POST", "/v1/tasks", json=self._body(request)))
        return Task.from_doc(self._call("POST", "/v1/tasks", data={"spec": json.dumps(self._body(request))},
                                        files={"upload": ("upload.tar.gz", upload, "application/gzip")},
                                        timeout=httpx.Timeout(600.0, connect=5.0)))

    def dry_run(self, request: SubmitRequest) -> str:
        request.validate()
        return str(self._call("POST", "/v1/tasks", params={"dry_run": "true"}, json=self._body(request))["placement"])

    def get(self, task_id: str) -> Task:
        return Task.from_doc(self._call("GET", f"/v1/tasks/{_q(task_id)}"))

    def list_tasks(self, user: str | None = None, status: list[TaskStatus] | None = None, worker: str | None = None,
                   limit: int = 50) -> list[Task]:
        params: list[tuple[str, str | int]] = [("user", user or "all"), ("limit", limit)]
        params += [("status", s.value) for s in status or []]
        if worker:
            params.append(("worker", worker))
        return [Task.from_doc(d) for d in self._call("GET", "/v1/tasks", params=params)]

    def cancel(self, task_id: str, by: str | None = None, wait_s: float | None = None) -> Task:
        params = {"wait": "false" if wait_s == 0 else "true"}
        return Task.from_doc(self._call("POST", f"/v1/tasks/{_q(task_id)}/cancel", params=params,
                                        timeout=httpx.Timeout(120.0, connect=5.0)))

    # -- logs -------------------------------------------------------------------------------------------
    def follow_batches(self, task_id: str, after_seq: int = 0, follow: bool = True,
                       on_reconnect: Callable[[Exception], None] | None = None,
                       reconnect_for_s: float = 60.0, timestamps: bool = True) -> Iterator[Sequence[LogEvent]]:
        """The log from line ``after_seq + 1`` in batches, over SSE; a dropped connection is resumed with
        ``Last-Event-ID`` (no gap, no duplicate) for ``reconnect_for_s``. Without ``timestamps`` the lines' stamps
        are empty: the master leaves them out, two thirds of a short line's bytes."""
        seq = after_seq
        broken_since: float | None = None
        # each batch as one JSON object: decoded in one call, as direct mode decodes a stream entry
        params = {"follow": "true" if follow else "false", "timestamps": "true" if timestamps else "false",
                  "batch": "json"}
        while True:
            try:
                with self._http.stream("GET", f"/v1/tasks/{_q(task_id)}/logs", params=params,
                                       headers={"Accept": "text/event-stream", "Last-Event-ID": str(seq)}) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        raise _api_error(resp)
                    for event in parse_sse(resp.iter_raw()):
                        broken_since = None
                        if event.kind == "end":
                            end = json.loads("\n".join(event.data))
                            yield [LogEnd(end["status"], end.get("exit_code"), end.get("reason"))]
                            return
                        if event.kind == "error":
                            err = json.loads("\n".join(event.data))
                            raise ApiError(200, err["type"], err["message"], int(err["exit_code"]))
                        if event.kind == "comment":
                            if follow:
                                yield []  # a viewer checks for a key press
                            continue
                        if event.id is None or not event.data or event.kind not in ("message", "lines"):
                            continue
                        yield event_lines(event)
                        seq = int(event.id)
                if not follow:
                    return
                raise httpx.RemoteProtocolError("the server closed the log stream before its end")
            except (httpx.TransportError, httpx.StreamError) as exc:
                now = time.monotonic()
                broken_since = broken_since or now
                if now - broken_since > reconnect_for_s:
                    raise ApiUnavailable(self.url, exc) from None
                if on_reconnect is not None:
                    on_reconnect(ApiUnavailable(self.url, exc))
                time.sleep(1.0)

    def follow(self, task_id: str, after_seq: int = 0, follow: bool = True) -> Iterator[LogEvent]:
        for batch in self.follow_batches(task_id, after_seq, follow):
            yield from batch

    def logs(self, task_id: str) -> Iterator[LogEvent]:
        return self.follow(task_id, follow=False)

    # -- workers ----------------------------------------------------------------------------------------
    def workers(self) -> list[WorkerView]:
        return [WorkerView.from_doc(d) for d in self._call("GET", "/v1/workers")]

    def set_worker_state(self, worker_id: str, state: WorkerState) -> WorkerInfo:
        action = "undrain" if state == WorkerState.ACTIVE else "drain"
        return WorkerInfo.from_doc(self._call("POST", f"/v1/workers/{_q(worker_id)}/{action}"))

    def remove_worker(self, worker_id: str, force: bool = False) -> None:
        self._call("DELETE", f"/v1/workers/{_q(worker_id)}", params={"force": "true" if force else "false"})

    # -- artifacts --------------------------------------------------------------------------------------
    def artifacts(self, task_id: str) -> list[Artifact]:
        doc = self._call("GET", f"/v1/tasks/{_q(task_id)}/artifacts")
        return [_artifact(task_id, a["path"], a["size"], a["sha256"], a.get("stored_at")) for a in doc["artifacts"]]

    @contextmanager
    def open_artifact(self, task_id: str, path: str, offset: int = 0,
                      sha256: str | None = None) -> Iterator[tuple[Artifact, int, Iterator[bytes]]]:
        """One output's record, the offset its bytes start at, and the bytes as they arrive: from ``offset``
        (``Range``) while the file is still the one of digest ``sha256`` (``If-Range``), else from the start."""
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if sha256:
                headers["If-Range"] = f'"{sha256}"'
        url = f"/v1/tasks/{_q(task_id)}/artifacts/{'/'.join(_q(p) for p in path.strip('/').split('/'))}"
        try:
            with self._http.stream("GET", url, headers=headers,
                                   timeout=httpx.Timeout(300.0, connect=5.0)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise _api_error(resp)
                total = resp.headers.get("content-range", "").rpartition("/")[2]
                size = int(total) if resp.status_code == 206 and total.isdigit() else int(
                    resp.headers.get("content-length", "0"))
                start = offset if resp.status_code == 206 else 0
                found = _artifact(task_id, "/" + path.strip("/"), size, resp.headers.get("x-checksum-sha256", ""))
                yield found, start, resp.iter_bytes(1 << 20)
        except httpx.TransportError as exc:
            raise ApiUnavailable(self.url, exc) from None

    def delete_artifacts(self, task_id: str) -> int:
        return int(self._call("DELETE", f"/v1/tasks/{_q(task_id)}/artifacts")["freed_bytes"])

    def quota_usage(self, user: str | None = None) -> tuple[Quota | None, dict[str, float]]:
        doc = self._call("GET", "/v1/quota", params={"user": user} if user else None)
        # the server decides whose quota it is (a user's own, whatever they asked): keep its answer's user
        return Quota(doc["user"], **doc["quota"]), doc["used"]


def event_lines(event: SSEvent) -> LineBatch:
    """The log lines of one SSE line event, in either format: ``event: lines`` with JSON ``{first, lines}`` and
    ``ts`` if timestamps were asked for (``?batch=json``; else the stamps are empty), or one ``data: <ts> <text>``
    field per line, the last numbered ``id:``. Column-wise, with no Python call per line: a 100k-line log is 100k
    of these."""
    if event.kind == "lines":
        doc = json.loads(event.data[0])
        texts, stamps, first = doc["lines"], doc.get("ts"), int(doc["first"])
        if stamps is None:  # not asked for
            stamps = [""] * len(texts)
        elif len(stamps) != len(texts):  # the master passes the stream entries' arrays on as they are: only an
            # entry not written by CloudAI's writer (which writes as many of each) could make them differ
            stamps = fit_column(stamps, len(texts))
    else:
        parts = [d.partition(" ") for d in event.data]
        texts, stamps, first = [p[2] for p in parts], [p[0] for p in parts], int(event.id or 0) - len(parts) + 1
    return LineBatch(first, texts, stamps)


def _artifact(task_id: str, path: str, size: int, sha256: str, stored_at: str | None = None) -> Artifact:
    from datetime import datetime

    from cloudai.artifacts.base import ArtifactKey
    from cloudai.models import utcnow

    when = datetime.fromisoformat(stored_at) if stored_at else utcnow()
    return Artifact(ArtifactKey(task_id, "", "output", path, ""), int(size), sha256, when)


def _q(part: str) -> str:
    from urllib.parse import quote

    return quote(part, safe="")
