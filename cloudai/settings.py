"""Configuration from the environment (12-factor); CLI flags override through :meth:`Settings.replace`."""

from __future__ import annotations

import dataclasses
import getpass
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from cloudai.errors import ConfigError
from cloudai.limits import CAPABILITIES
from cloudai.runoptions import DEFAULT_ULIMIT_BOUNDS, ulimit_bounds


def _default_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers: the seed's admin default
        return "admin"


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise ConfigError(f"{name}={raw!r} must not be negative")
    return value


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = _float(env, name, default)
    if value != int(value):
        raise ConfigError(f"{name}={env.get(name)!r} must be a whole number")
    return int(value)


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    """A duration that must be more than 0 (0 would close every connection or end every session at once)."""
    value = _float(env, name, default)
    if value <= 0:
        raise ConfigError(f"{name}={env.get(name)!r} must be more than 0 seconds")
    return value


_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])", re.IGNORECASE)
KiB, MiB, GiB = 1024, 1024**2, 1024**3


def _size(env: Mapping[str, str], name: str, default: int, low: int = 0) -> int:
    """Bytes from ``1048576``, ``64k``, ``64m``, ``1g``, ``1GiB`` (powers of 1024); 0 where a limit allows "none"."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    match = _SIZE.match(raw)
    if not match:
        raise ConfigError(f"{name}={raw!r}: use bytes or a size such as 64k, 64m, 1g (powers of 1024)")
    value = int(match.group(1)) * {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024**4}[match.group(2).lower()]
    if value and value < low:
        raise ConfigError(f"{name}={raw!r} is below the minimum of {low} bytes")
    return value


def _duration(env: Mapping[str, str], name: str, default: float) -> float:
    """Seconds from ``86400`` or ``30d``, ``12h``, ``1h30m``."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return _float(env, name, default)
    except ConfigError:
        parts = _DURATION.findall(raw)
        if not parts or _DURATION.sub("", raw).strip():
            raise ConfigError(f"{name}={raw!r}: use seconds (86400) or units s/m/h/d such as 30d or 12h") from None
    return sum(float(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u.lower()] for n, u in parts)


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}={env.get(name)!r}: use 1/true/yes or 0/false/no")
def _optional_whole(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    """A count where ``none`` (or ``unlimited``) means no limit; empty keeps ``default``."""
    raw = env.get(name, "").strip()
    if raw.lower() in ("none", "unlimited"):
        return None
    return default if raw == "" else _int(env, name, 0)


def _optional_number(env: Mapping[str, str], name: str, default: float | None) -> float | None:
    raw = env.get(name, "").strip()
    if raw.lower() in ("none", "unlimited"):
        return None
    return default if raw == "" else _float(env, name, 0.0)


def _optional_size(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    """:func:`_size`, where ``none`` (or ``unlimited``) means no limit."""
    if env.get(name, "").strip().lower() in ("none", "unlimited"):
        return None
    return default if env.get(name, "").strip() == "" else _size(env, name, 0)


def _caps(env: Mapping[str, str], name: str, allow_all: bool) -> tuple[str, ...]:
    names = tuple(c.upper().removeprefix("CAP_") for c in _list(env, name))
    for cap in names:
        if cap not in CAPABILITIES and not (allow_all and cap == "ALL"):
            raise ConfigError(f"{name}: unknown capability {cap!r}; use names such as NET_RAW or SYS_PTRACE"
                              + (" (or ALL)" if allow_all else ""))
    return names


LOG_OVER_BUDGET = ("keep-running", "stop")


def _line_cap(env: Mapping[str, str]) -> int:
    value = _size(env, "CLOUDAI_LOG_MAX_LINE", 64 * KiB)
    if not KiB <= value <= 16 * MiB:
        raise ConfigError(f"CLOUDAI_LOG_MAX_LINE={env.get('CLOUDAI_LOG_MAX_LINE')!r}: use 1k to 16m")
    return value


@dataclass(frozen=True)
class Settings:
    """Everything a CloudAI process needs to know about its cluster."""

    redis_url: str = "redis://localhost:6379/0"
    store_url: str = "mongodb://localhost:27017/cloudai"
    worker_id: str = dataclasses.field(default_factory=socket.gethostname)
    user: str = dataclasses.field(default_factory=_default_user)
    heartbeat_interval_s: float = 5.0
    heartbeat_timeout_s: float = 30.0
    beat_interval_s: float = 5.0
    log_retention_s: float = 24 * 3600.0
    log_stream_maxlen: int = 1_000_000
    # log bytes (docs/architecture.md, "Logs"): what one attempt's log keeps (0: no limit) and what it does past
    # that; the longest line before it is cut; what a task's live stream holds in Redis (0: lines only bound it);
    # how long an archive outlives its task (0: for ever); the rotation of task containers' Docker log
    log_max_bytes: int = GiB
    log_over_budget: str = "keep-running"
    log_max_line: int = 64 * KiB
    log_redis_bytes: int = 64 * MiB
    log_archive_retention_s: float = 30 * 86400.0
    docker_log_max_size: int = 10 * MiB
    docker_log_max_file: int = 3
    stop_grace_s: float = 10.0
    placement_policy: str = "spread"
    docker_network: str | None = None
    pids_limit: int = 4096
    # task containers: capabilities beyond the default to drop / add (see cloudai.limits.DEFAULT_CAPS), and the
    # glob patterns of the images that may run (empty: any). A worker applies its own list again.
    cap_drop: tuple[str, ...] = ()
    cap_add: tuple[str, ...] = ()
    allowed_images: tuple[str, ...] = ()
    # bounds on what a task may ask of its container (checked at submit and again by each worker): the highest
    # hard limit of each --ulimit name (a name not listed may not be set), and whether --ipc host is allowed
    ulimits: tuple[tuple[str, int], ...] = tuple(ulimit_bounds(DEFAULT_ULIMIT_BOUNDS).items())
    allow_host_ipc: bool = False
    # data in and results out (cloudai/artifacts): where the artifact store is (a directory; default: GridFS in a
    # MongoDB store, else beside a SQLite store's file), the bytes one task's outputs and one upload may take,
    # a user's stored bytes (0: no limit), and how long files outlive their task (0: for ever)
    artifact_dir: str | None = None
    output_max_bytes: int = GiB
    upload_max_bytes: int = 100 * MiB
    artifact_quota_bytes: int = 0
    artifact_retention_s: float = 30 * 86400.0
    # what this host offers when it runs a worker (``cloudai worker start`` flags override)
    worker_cpus: str = ""  # default: all cores
    worker_memory: str = ""  # default: all memory
    worker_gpus: str = "auto"  # auto | none | 0,1
    worker_labels: str = ""  # gpu=a100,zone=b
    worker_volumes: str = ""  # data=/srv/datasets:ro,outputs=/srv/outputs/{user}:rw (cloudai/volumes.py)
    worker_concurrency: int = 16
    fairshare_halflife_s: float = 7 * 86400.0  # fair-share usage halves over this (Slurm's default: 7 days)
    # the master's URL: when set, the CLI's user commands go through its API with this token
    api_url: str | None = None
    token: str | None = dataclasses.field(default=None, repr=False)
    # -- the master's limits on one user or client (README: "Limits and defaults"); 0 turns a rate off
    followers_per_user: int = 100  # live-log followers (SSE or text) one user holds open at once
    follow_reconnect_s: float = 60.0  # a follower retries Redis this long before `event: error`
    api_read_rate: float = 50.0  # GET/HEAD requests a second per token, refilling a bucket of ...
    api_read_burst: int = 500
    api_write_rate: float = 20.0  # POST/PUT/PATCH/DELETE requests a second per token, a bucket of ...
    api_write_burst: int = 200
    signin_failures: int = 10  # failed sign-ins (bad tokens) from one address within the window ...
    signin_window_s: float = 60.0  # ... before that address gets 429 until the window has passed
    session_ttl_s: float = 12 * 3600.0  # a browser session lasts this long from sign-in (not sliding)
    server_header_timeout_s: float = 10.0  # a request's head must arrive within this (slowloris)
    server_body_timeout_s: float = 60.0  # and its body within this after the head
    server_keepalive_s: int = 5  # an idle kept-alive connection is closed after this
    server_max_connections: int = 1000  # connections the master serves at once; past it, 503
    # -- what one user may hold of what everyone shares (README: "Limits and defaults"); the master applies the
    # quotas and caps at submit, each worker its PID, disk, registry and label policy again on its own host
    default_quota_tasks: int | None = None  # queued + running tasks per user without an admin-set limit
    default_quota_cpus: float | None = None
    default_quota_memory: int | None = None  # bytes
    default_quota_gpus: int | None = None
    default_quota_waiting: int | None = 1000  # pending tasks per user; past it a submit is refused
    max_timeout_s: float = 7 * 86400.0  # the longest --timeout (0: no cap)
    default_timeout_s: float = 0.0  # a task's timeout when it gives none (0: max_timeout_s)
    pids_reserve: int = 8192  # PIDs (threads) of the host that tasks never get; the rest is split over slots
    task_disk: int = 10 * 1024**3  # a task's writable-layer budget when it asks for none (0: none)
    max_task_disk: int = 100 * 1024**3  # the most --storage may ask (0: no cap)
    disk_min_free: int = 1024**3  # below this much free in Docker's data root a worker takes no new task
    disk_check_interval_s: float = 5.0  # how often a worker measures its containers and its free space
    allowed_registries: tuple[str, ...] = ("docker.io", "ghcr.io", "quay.io", "nvcr.io")
    reserved_label_prefixes: tuple[str, ...] = (
        "cloudai.", "com.docker.", "io.kubernetes.", "io.containerd.", "org.opencontainers.", "traefik.",
        "com.centurylinklabs.watchtower.", "io.portainer.", "org.label-schema.", "autoheal")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read ``CLOUDAI_*`` variables; unset ones keep the documented defaults."""
        env = os.environ if env is None else env
        base = cls()
        policy = env.get("CLOUDAI_PLACEMENT", base.placement_policy)
        if policy not in ("spread", "pack"):
            raise ConfigError(f"CLOUDAI_PLACEMENT={policy!r}: use 'spread' (least loaded) or 'pack' (best fit)")
        over_budget = env.get("CLOUDAI_LOG_OVER_BUDGET") or base.log_over_budget
        if over_budget not in LOG_OVER_BUDGET:
            raise ConfigError(f"CLOUDAI_LOG_OVER_BUDGET={over_budget!r}: use 'keep-running' (the log stops, the task "
                              "runs on) or 'stop' (the task is stopped)")
        if _int(env, "CLOUDAI_DOCKER_LOG_MAX_FILE", base.docker_log_max_file) < 1:
            raise ConfigError("CLOUDAI_DOCKER_LOG_MAX_FILE must be 1 or more (the files Docker keeps of a log)")
        return cls(
            redis_url=env.get("CLOUDAI_REDIS_URL") or base.redis_url,
            store_url=env.get("CLOUDAI_STORE_URL") or base.store_url,
            worker_id=env.get("CLOUDAI_WORKER_ID") or base.worker_id,
            user=env.get("CLOUDAI_USER") or base.user,
            heartbeat_interval_s=_float(env, "CLOUDAI_HEARTBEAT_INTERVAL", base.heartbeat_interval_s),
            heartbeat_timeout_s=_float(env, "CLOUDAI_HEARTBEAT_TIMEOUT", base.heartbeat_timeout_s),
            beat_interval_s=_float(env, "CLOUDAI_BEAT_INTERVAL", base.beat_interval_s),
            log_retention_s=_float(env, "CLOUDAI_LOG_RETENTION", base.log_retention_s),
            log_stream_maxlen=_int(env, "CLOUDAI_LOG_MAXLEN", base.log_stream_maxlen),
            log_max_bytes=_size(env, "CLOUDAI_LOG_MAX_BYTES", base.log_max_bytes, low=64 * KiB),
            log_over_budget=over_budget,
            log_max_line=_line_cap(env),
            log_redis_bytes=_size(env, "CLOUDAI_LOG_REDIS_BYTES", base.log_redis_bytes, low=MiB),
            log_archive_retention_s=_duration(env, "CLOUDAI_LOG_ARCHIVE_RETENTION", base.log_archive_retention_s),
            docker_log_max_size=_size(env, "CLOUDAI_DOCKER_LOG_MAX_SIZE", base.docker_log_max_size, low=KiB),
            docker_log_max_file=_int(env, "CLOUDAI_DOCKER_LOG_MAX_FILE", base.docker_log_max_file),
            stop_grace_s=_float(env, "CLOUDAI_STOP_GRACE", base.stop_grace_s),
            placement_policy=policy,
            docker_network=env.get("CLOUDAI_DOCKER_NETWORK") or None,
            pids_limit=_int(env, "CLOUDAI_PIDS_LIMIT", base.pids_limit),
            cap_drop=_caps(env, "CLOUDAI_CAP_DROP", allow_all=True),
            cap_add=_caps(env, "CLOUDAI_CAP_ADD", allow_all=False),
            allowed_images=_list(env, "CLOUDAI_ALLOWED_IMAGES"),
            ulimits=tuple(ulimit_bounds(env.get("CLOUDAI_ULIMITS", DEFAULT_ULIMIT_BOUNDS)).items()),
            allow_host_ipc=_bool(env, "CLOUDAI_ALLOW_HOST_IPC"),
            artifact_dir=env.get("CLOUDAI_ARTIFACT_DIR") or None,
            output_max_bytes=_size(env, "CLOUDAI_OUTPUT_MAX_BYTES", base.output_max_bytes),
            upload_max_bytes=_size(env, "CLOUDAI_UPLOAD_MAX_BYTES", base.upload_max_bytes, low=KiB),
            artifact_quota_bytes=_size(env, "CLOUDAI_ARTIFACT_QUOTA_BYTES", base.artifact_quota_bytes),
            artifact_retention_s=_duration(env, "CLOUDAI_ARTIFACT_RETENTION", base.artifact_retention_s),
            worker_cpus=env.get("CLOUDAI_WORKER_CPUS", ""),
            worker_memory=env.get("CLOUDAI_WORKER_MEMORY", ""),
            worker_gpus=env.get("CLOUDAI_WORKER_GPUS") or base.worker_gpus,
            worker_labels=env.get("CLOUDAI_WORKER_LABELS", ""),
            worker_volumes=env.get("CLOUDAI_WORKER_VOLUMES", ""),
            worker_concurrency=_int(env, "CLOUDAI_WORKER_CONCURRENCY", base.worker_concurrency),
            fairshare_halflife_s=_float(env, "CLOUDAI_FAIRSHARE_HALFLIFE", base.fairshare_halflife_s),
            api_url=(env.get("CLOUDAI_API_URL") or "").rstrip("/") or None,
            token=env.get("CLOUDAI_TOKEN") or None,
            followers_per_user=_int(env, "CLOUDAI_FOLLOWERS_PER_USER", base.followers_per_user),
            follow_reconnect_s=_float(env, "CLOUDAI_FOLLOW_RECONNECT", base.follow_reconnect_s),
            api_read_rate=_float(env, "CLOUDAI_API_READ_RATE", base.api_read_rate),
            api_read_burst=_int(env, "CLOUDAI_API_READ_BURST", base.api_read_burst),
            api_write_rate=_float(env, "CLOUDAI_API_WRITE_RATE", base.api_write_rate),
            api_write_burst=_int(env, "CLOUDAI_API_WRITE_BURST", base.api_write_burst),
            signin_failures=_int(env, "CLOUDAI_SIGNIN_FAILURES", base.signin_failures),
            signin_window_s=_float(env, "CLOUDAI_SIGNIN_WINDOW", base.signin_window_s),
            session_ttl_s=_positive(env, "CLOUDAI_SESSION_TTL", base.session_ttl_s),
            server_header_timeout_s=_positive(env, "CLOUDAI_SERVER_HEADER_TIMEOUT", base.server_header_timeout_s),
            server_body_timeout_s=_positive(env, "CLOUDAI_SERVER_BODY_TIMEOUT", base.server_body_timeout_s),
            server_keepalive_s=max(1, _int(env, "CLOUDAI_SERVER_KEEPALIVE", base.server_keepalive_s)),
            server_max_connections=max(1, _int(env, "CLOUDAI_SERVER_MAX_CONNECTIONS",
                                               base.server_max_connections)),
            default_quota_tasks=_optional_whole(env, "CLOUDAI_DEFAULT_QUOTA_TASKS", base.default_quota_tasks),
            default_quota_cpus=_optional_number(env, "CLOUDAI_DEFAULT_QUOTA_CPUS", base.default_quota_cpus),
            default_quota_memory=_optional_size(env, "CLOUDAI_DEFAULT_QUOTA_MEMORY", base.default_quota_memory),
            default_quota_gpus=_optional_whole(env, "CLOUDAI_DEFAULT_QUOTA_GPUS", base.default_quota_gpus),
            default_quota_waiting=_optional_whole(env, "CLOUDAI_DEFAULT_QUOTA_WAITING", base.default_quota_waiting),
            max_timeout_s=_duration(env, "CLOUDAI_MAX_TIMEOUT", base.max_timeout_s),
            default_timeout_s=_duration(env, "CLOUDAI_DEFAULT_TIMEOUT", base.default_timeout_s),
            pids_reserve=_int(env, "CLOUDAI_PIDS_RESERVE", base.pids_reserve),
            task_disk=_size(env, "CLOUDAI_TASK_DISK", base.task_disk),
            max_task_disk=_size(env, "CLOUDAI_MAX_TASK_DISK", base.max_task_disk),
            disk_min_free=_size(env, "CLOUDAI_DISK_MIN_FREE", base.disk_min_free),
            disk_check_interval_s=_float(env, "CLOUDAI_DISK_CHECK_INTERVAL", base.disk_check_interval_s) or 5.0,
            allowed_registries=_list(env, "CLOUDAI_ALLOWED_REGISTRIES") or base.allowed_registries,
            reserved_label_prefixes=(_list(env, "CLOUDAI_RESERVED_LABEL_PREFIXES")
                                     if "CLOUDAI_RESERVED_LABEL_PREFIXES" in env else base.reserved_label_prefixes),
        )

    def replace(self, **changes: object) -> Settings:
        """A copy with CLI overrides applied; ``None`` values leave a field as it is."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]
