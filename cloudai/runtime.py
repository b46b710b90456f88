"""Docker runtime: create, start, stream, wait, inspect, stop and remove resource-limited containers.
Knows nothing of Celery or the store."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import docker
import docker.errors
import requests.exceptions
from docker.types import DeviceRequest, LogConfig, Mount, Ulimit

from cloudai import keys
from cloudai.docker_adapter import AttachStream
from cloudai.errors import DockerUnavailable, ImageError, RuntimeFailure
from cloudai.imagepolicy import pull_reason
from cloudai.limits import DEFAULT_CAPS
from cloudai.models import format_bytes
from cloudai.runoptions import Ulimit as UlimitSpec
from cloudai.submission import PULL_POLICIES
from cloudai.volumes import Bind

log = logging.getLogger(__name__)

ENGINE_RESTARTED = "the Docker engine restarted; the container was killed"


@dataclass
class ContainerSpec:
    """What to run and with which limits. ``command`` and ``entrypoint`` are Docker's Cmd and Entrypoint: the
    arguments replace the image's CMD (None keeps it) and go to its ENTRYPOINT, which ``entrypoint`` replaces
    (``['']`` clears it, as ``docker run --entrypoint ''`` does)."""

    image: str
    command: list[str] | None
    cpus: float
    memory: int  # bytes; swap is disabled (memswap == memory)
    task_id: str
    worker_id: str
    gpu_ids: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    storage: int | None = None
    pids_limit: int = 4096
    network: str | None = None
    name: str | None = None
    capabilities: list[str] = field(default_factory=lambda: list(DEFAULT_CAPS))  # all others are dropped
    read_only: bool = False  # read-only root filesystem with a writable tmpfs /tmp
    log_max_size: int = 0  # Docker's json-file log rotation: bytes a file, files kept (0: Docker's default)
    log_max_file: int = 1
    entrypoint: list[str] | None = None
    binds: list[Bind] = field(default_factory=list)  # volumes, resolved on this host (cloudai.volumes.resolve)
    shm_size: int | None = None  # bytes of /dev/shm (tmpfs pages count against the memory limit)
    user: str | None = None  # UID[:GID] or a name of the image
    ipc_mode: str | None = None
    ulimits: list[UlimitSpec] = field(default_factory=list)


class EngineError(Exception):
    """The Docker engine did not answer (restarting, or a timeout): supervision retries."""


@dataclass(frozen=True)
class ExitState:
    exit_code: int
    oom_killed: bool
    error: str


class ImageMissing(RuntimeFailure):
    """The engine does not have the image a create asked for (the caller pulls it, or says why it can't)."""


def host_config_args(spec: ContainerSpec) -> dict[str, Any]:
    """Arguments of ``create_host_config`` for ``spec``: exactly the limits the task asked for."""
    args: dict[str, Any] = {
        "nano_cpus": int(round(spec.cpus * 1e9)),
        "mem_limit": spec.memory,
        "memswap_limit": spec.memory,  # equal: no swap, so an OOM kill is an OOM kill
        "pids_limit": spec.pids_limit,
        "privileged": False,
        "security_opt": ["no-new-privileges"],  # Docker's default seccomp profile stays on (never unconfined)
        "cap_drop": ["ALL"],
        "cap_add": list(spec.capabilities),
    }
    if spec.read_only:
        args["read_only"] = True
        # /tmp stays writable; tmpfs pages count against the task's memory limit
        args["tmpfs"] = {"/tmp": f"rw,nosuid,nodev,size={spec.memory}"}
    if spec.gpu_ids:
        args["device_requests"] = [DeviceRequest(device_ids=list(spec.gpu_ids), capabilities=[["gpu"]])]
    if spec.storage:
        args["storage_opt"] = {"size": str(spec.storage)}
    if spec.network:
        args["network_mode"] = spec.network
    if spec.log_max_size:
        # Docker's own log of the container, rotated: the worker reads the attach stream, and Docker's log
        # only when that stream broke, after a worker restart, or to catch up at exit. Rotation bounds it on
        # the host's disk, so such a fallback read finds at most max-size x max-file of the latest output:
        # lines already rotated away then are lost, and counted lines may be misplaced (docs/architecture.md)
        args["log_config"] = LogConfig(type=LogConfig.types.JSON, config={
            "max-size": str(spec.log_max_size), "max-file": str(max(1, spec.log_max_file))})
    if spec.binds:
        args["mounts"] = [Mount(target=b.target, source=b.source, type="bind", read_only=b.read_only)
                          for b in spec.binds]
    if spec.shm_size:
        args["shm_size"] = spec.shm_size
    if spec.ipc_mode:
        args["ipc_mode"] = spec.ipc_mode
    if spec.ulimits:
        args["ulimits"] = [Ulimit(name=u.name, soft=u.soft, hard=u.hard) for u in spec.ulimits]
    return args


def container_env(spec: ContainerSpec) -> dict[str, str]:
    """The task's environment with the GPUs it may see forced: its own ids, or ``void`` (none) when it has
    none, so the NVIDIA runtime never exposes another task's or every GPU (users can't set this key)."""
    return {**spec.env, "NVIDIA_VISIBLE_DEVICES": ",".join(spec.gpu_ids) or "void"}


def container_labels(spec: ContainerSpec) -> dict[str, str]:
    return {**spec.labels, keys.LABEL_TASK_ID: spec.task_id, keys.LABEL_WORKER_ID: spec.worker_id}


class DockerRuntime:
    """A thin, typed layer over docker-py's low-level API."""

    def __init__(self, client: docker.DockerClient | None = None) -> None:
        try:
            self.client = client or docker.from_env(timeout=120)
            self.api = self.client.api
            self.api.ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DockerUnavailable(exc) from exc

    def ensure_image(self, image: str, policy: str = "missing") -> None:
        """Make ``image`` present by ``policy``; raises :class:`ImageError` saying which image and why."""
        if policy not in PULL_POLICIES:
            raise ImageError(f"unknown pull policy {policy!r}; use one of {', '.join(PULL_POLICIES)}")
        present = self._has_image(image)
        if present and policy != "always":
            return
        if policy == "never":
            raise ImageError(
                f"image {image!r} is not on this worker and the pull policy is 'never'; "
                "load it there (docker load / docker pull) or submit with --pull missing"
            )
        repo, tag = _split_tag(image)
        try:
            self.api.pull(repo, tag=tag)
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            # 'always' means the registry's current image: a stale local copy is not run silently. The user
            # gets a few fixed words: the engine's text can hold the registry's body and the worker network's
            # addresses (its DNS server); the operator finds it here
            detail = getattr(exc, "explanation", None) or str(exc)
            log.warning("pull of %s failed: %s", image, detail)
            reason = pull_reason(getattr(exc, "status_code", None), str(detail))
            raise ImageError(f"image {image!r} could not be pulled: {reason}") from exc

    def storage(self) -> tuple[str, str]:
        """Docker's storage driver and data root (``docker info``; ``unknown`` when the engine won't say: the
        disk guard then measures, which works on every driver)."""
        try:
            info = self.api.info()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            log.warning("docker info failed (%s); the storage driver is taken as unknown", exc)
            info = {}
        return str(info.get("Driver") or "unknown"), str(info.get("DockerRootDir") or "/var/lib/docker")

    def writable_sizes(self, worker_id: str) -> dict[str, int]:
        """The writable-layer size (bytes) of each running container of ``worker_id``, by execution id
        (``docker ps --size``)."""
        listed = self.api.containers(size=True, filters={"label": [f"{keys.LABEL_WORKER_ID}={worker_id}"]})
        return {c["Labels"][keys.LABEL_EXECUTION_ID]: int(c.get("SizeRw") or 0)
                for c in listed if (c.get("Labels") or {}).get(keys.LABEL_EXECUTION_ID)}

    def _has_image(self, image: str) -> bool:
        try:
            self.api.inspect_image(image)
            return True
        except docker.errors.ImageNotFound:
            return False
        except docker.errors.APIError as exc:
            log.warning("inspect of image %s failed: %s", image, exc.explanation)
            raise ImageError(f"image {image!r} could not be inspected: "
                             f"{pull_reason(exc.status_code, str(exc.explanation))}") from exc

    def create(self, spec: ContainerSpec) -> str:
        """Create (never auto-remove: that loses the log and the exit state) and return the id. Raises
        :class:`ImageMissing` when the image is not here (so a present image costs no separate inspect, as
        ``docker run`` does it)."""
        try:
            host_config = self.api.create_host_config(**host_config_args(spec))
            created = self.api.create_container(
                spec.image,
                # lists, never strings: docker-py would split a string as a shell does
                command=list(spec.command) if spec.command else None,
                entrypoint=list(spec.entrypoint) if spec.entrypoint is not None else None,
                user=spec.user,
                environment=container_env(spec),
                working_dir=spec.workdir,
                labels=container_labels(spec),
                host_config=host_config,
                name=spec.name,
            )
        except docker.errors.ImageNotFound as exc:
            raise ImageMissing(f"image {spec.image!r} is not on this worker") from exc
        except docker.errors.APIError as exc:
            raise RuntimeFailure(f"docker could not create the container: {exc.explanation or exc}") from exc
        return str(created["Id"])

    def start(self, container_id: str) -> None:
        try:
            self.api.start(container_id)
        except docker.errors.APIError as exc:
            reason = str(exc.explanation or exc)
            raise RuntimeFailure(f"docker could not start the container: {reason}{_exec_hint(reason)}") from exc

    def stream_frames(self, container_id: str, follow: bool = True) -> Iterator[bytes]:
        """Log frames (``b"<ts> <payload>"``) from the first one; with ``follow``, until the container ends.

        docker-py's ``logs(stream=True)`` reads frame by frame (~25 us a line), several times slower than the
        attach stream's big reads; it serves only when that stream broke and to catch up after exit. It turns a
        quiet task's socket timeout off itself. Containers are never created with a TTY, so each item is one
        frame."""
        stream = self.api.logs(container_id, stream=True, follow=follow, timestamps=True, tail="all")
        return _closing(stream)

    def attach_frames(self, container_id: str) -> Iterator[bytes | None]:
        """The container's output as it is written (``docker run``'s attach), opened before :meth:`start` so
        nothing is missed; frames in :meth:`stream_frames`' form, stamped with the time they arrived here.

        Docker's log API re-reads the json-file log (~20 us a line in dockerd, and a follow stream may end
        before the last lines at exit); the attach stream comes straight from the container's pipes and ends
        once all of its output has been copied, so a task's output is read once. The stream ends (EOF) when
        the container exits; an exception means it broke and supervision reads on from Docker's log."""
        stream = AttachStream(self.api, container_id)
        return _demultiplex_reads(stream.read, stream.close, stamp=True)

    def attach_chunks(self, container_id: str) -> Iterator[list[bytes]]:
        """:meth:`attach_frames`, a list of frames per socket read (what arrived together is handed on
        together: no waiting, and one hand-over per read rather than per line)."""
        return _chunked(self.attach_frames(container_id))

    def wait(self, container_id: str, timeout: float = 30.0) -> int | None:
        """The exit code once the container has stopped; None when it is gone. Waits at most ``timeout``
        (raises :class:`EngineError` when the engine does not answer in time or at all)."""
        try:
            result = self.api.wait(container_id, timeout=timeout)
        except docker.errors.NotFound:
            return None
        except (requests.exceptions.RequestException, docker.errors.APIError) as exc:
            raise EngineError(exc) from exc
        return int(result.get("StatusCode", -1))

    def state(self, container_id: str) -> str:
        """``running``, ``exited`` (created, exited, dead), ``gone``, or ``unknown`` when the engine can't be
        asked (restarting): supervision keeps enforcing and asks again."""
        try:
            info = self.api.inspect_container(container_id)
        except docker.errors.NotFound:
            return "gone"
        except (requests.exceptions.RequestException, docker.errors.DockerException):
            return "unknown"
        return "running" if info.get("State", {}).get("Running") else "exited"

    def poll(self, container_id: str) -> tuple[str, ExitState | None]:
        """:meth:`state` and, once the container has stopped, its exit, from one inspect: a container that has
        ended needs no separate wait and inspect (Docker records the exit code and the OOM kill together when it
        marks the container stopped, which is also when ``wait`` returns)."""
        try:
            info = self.api.inspect_container(container_id)
        except docker.errors.NotFound:
            return "gone", None
        except (requests.exceptions.RequestException, docker.errors.DockerException):
            return "unknown", None
        state = info.get("State", {})
        if state.get("Running"):
            return "running", None
        return "exited", ExitState(int(state.get("ExitCode", -1)), bool(state.get("OOMKilled")),
                                   state.get("Error") or "")

    def kill(self, container_id: str) -> None:
        """SIGKILL now (a stop that did not work, or a worker fencing itself)."""
        try:
            self.api.kill(container_id)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: not running any more
                raise

    def inspect(self, container_id: str) -> dict[str, Any] | None:
        try:
            return self.api.inspect_container(container_id)  # type: ignore[no-any-return]
        except docker.errors.NotFound:
            return None

    def exit_state(self, container_id: str) -> ExitState:
        info = self.inspect(container_id) or {}
        state = info.get("State", {})
        return ExitState(int(state.get("ExitCode", -1)), bool(state.get("OOMKilled")), state.get("Error") or "")

    def is_running(self, container_id: str) -> bool:
        info = self.inspect(container_id)
        return bool(info and info.get("State", {}).get("Running"))

    def stop(self, container_id: str, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after ``grace_s`` (what ``docker stop`` does)."""
        try:
            self.api.stop(container_id, timeout=max(0, int(round(grace_s))))
        except docker.errors.NotFound:
            pass

    def remove(self, container_id: str) -> None:
        try:
            self.api.remove_container(container_id, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # removal already in progress
                raise

    def get_archive(self, container_id: str, path: str) -> Generator[bytes, None, None]:
        """A tar stream of ``path`` in the container, running or stopped (``docker cp``'s source: resolved inside
        the container's own filesystem, its last component not followed). Raises :class:`FileNotFoundError`
        when the container has no such path. Close the stream when not reading it to its end: the engine holds
        the container's lock while it writes the archive, so an abandoned stream blocks the next request."""
        try:
            chunks, _ = self.api.get_archive(container_id, path, chunk_size=1 << 20)
        except docker.errors.NotFound as exc:
            raise FileNotFoundError(path) from exc
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise RuntimeFailure(f"docker could not read {path} of the container: "
                                 f"{getattr(exc, 'explanation', None) or exc}") from exc
        return _closing(chunks)

    def put_archive(self, container_id: str, path: str, data: BinaryIO) -> None:
        """Unpack the tar ``data`` into directory ``path`` of a created container (``docker cp``'s target)."""
        try:
            self.api.put_archive(container_id, path, data)
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise RuntimeFailure(f"docker could not place the upload in the container: "
                                 f"{getattr(exc, 'explanation', None) or exc}") from exc

    def find(self, worker_id: str | None = None, task_id: str | None = None) -> list[dict[str, Any]]:
        """Containers (running or not) labelled by CloudAI, as ``docker ps -a`` entries."""
        filters = [keys.LABEL_TASK_ID if task_id is None else f"{keys.LABEL_TASK_ID}={task_id}"]
        if worker_id is not None:
            filters.append(f"{keys.LABEL_WORKER_ID}={worker_id}")
        return self.api.containers(all=True, filters={"label": filters})  # type: ignore[no-any-return]


def _closing(stream: Any) -> Generator[bytes, None, None]:
    """The items of docker-py's ``CancellableStream`` (or of a generator over a response), closed (its connection
    released) once read or dropped."""
    try:
        yield from stream
    finally:
        stream.close()


def _chunked(frames: Iterator[bytes | None]) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    for frame in frames:
        if frame is not None:
            chunk.append(frame)
        elif chunk:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def docker_timestamp(ns: int) -> str:
    """``time.time_ns()`` as Docker writes log timestamps (RFC 3339, nanoseconds, UTC)."""
    seconds, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{frac:09d}Z"


def _demultiplex_reads(read: Callable[[int], bytes | None], close: Callable[[], Any],
                       stamp: bool = False) -> Iterator[bytes | None]:
    """Payloads of Docker's multiplexed stream: frames of an 8-byte header (stream, 0, 0, 0, size as a big-endian
    uint32) and ``size`` bytes, read in 64 KiB pieces; None after the frames each read completed. With
    ``stamp``, each payload gets ``b"<ts> "`` in front (the arrival time of the piece it completed in), as the
    log API's ``timestamps=1`` frames have."""
    buf = bytearray()
    try:
        while True:
            chunk = read(65536)
            if not chunk:
                return
            buf += chunk
            prefix = (docker_timestamp(time.time_ns()) + " ").encode() if stamp else b""
            pos = 0
            while len(buf) - pos >= 8:
                size = int.from_bytes(buf[pos + 4 : pos + 8], "big")
                if len(buf) - pos - 8 < size:
                    break
                if size:
                    yield prefix + bytes(buf[pos + 8 : pos + 8 + size])
                pos += 8 + size
            del buf[:pos]
            yield None
    finally:
        close()


def _split_tag(image: str) -> tuple[str, str]:
    if "@" in image:
        return image, ""
    name, _, tag = image.rpartition(":")
    if name and "/" not in tag:
        return name, tag
    return image, "latest"


def _exec_hint(reason: str) -> str:
    """A hint for the usual cause of ``exec: "echo hi; exit 3": executable file not found``: one argument that
    holds a whole command line, which ``docker run`` (and CloudAI) take as a program's name."""
    if "executable file not found" in reason or "no such file or directory" in reason:
        name = reason.partition('exec: "')[2].partition('"')[0]
        if " " in name:
            return ("; the command is one argument holding spaces, which runs as a program of that name (as with "
                    "docker run): give its words as separate arguments, or submit with --shell to run it with "
                    "/bin/sh -c")
    return ""


def oom_reason(memory: int) -> str:
    return f"killed: out of memory, limit {format_bytes(memory)}"
