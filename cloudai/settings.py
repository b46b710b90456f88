"""Configuration from the environment (12-factor); CLI flags override through :meth:`Settings.replace`."""

from __future__ import annotations

import dataclasses
import getpass
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from cloudai.errors import CloudAIError, ConfigError
from cloudai.limits import CAPABILITIES


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


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


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


def _size(env: Mapping[str, str], name: str, default: int | None, allow_none: bool = False) -> int | None:
    """Bytes from ``512m``, ``10g``... (``0``: none; with ``allow_none``, ``none`` too)."""
    raw = env.get(name, "").strip()
    if raw == "":
        return default
    if allow_none and raw.lower() in ("none", "unlimited"):
        return None
    if raw == "0":
        return 0
    from cloudai.models import parse_size  # only when set: a client's `--help` doesn't load the models

    try:
        return parse_size(raw, name)
    except CloudAIError as exc:
        raise ConfigError(f"{name}={raw!r}: {exc}") from None


def _duration(env: Mapping[str, str], name: str, default: float) -> float:
    """Seconds from ``90``, ``30m``, ``7d`` (``0``: none)."""
    raw = env.get(name, "").strip()
    if raw == "":
        return default
    from cloudai.models import parse_duration

    try:
        return parse_duration(raw) or 0.0
    except CloudAIError as exc:
        raise ConfigError(f"{name}={raw!r}: {exc}") from None


def _caps(env: Mapping[str, str], name: str, allow_all: bool) -> tuple[str, ...]:
    names = tuple(c.upper().removeprefix("CAP_") for c in _list(env, name))
    for cap in names:
        if cap not in CAPABILITIES and not (allow_all and cap == "ALL"):
            raise ConfigError(f"{name}: unknown capability {cap!r}; use names such as NET_RAW or SYS_PTRACE"
                              + (" (or ALL)" if allow_all else ""))
    return names


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
    stop_grace_s: float = 10.0
    placement_policy: str = "spread"
    docker_network: str | None = None
    pids_limit: int = 4096
    # task containers: capabilities beyond the default to drop / add (see cloudai.limits.DEFAULT_CAPS), and the
    # glob patterns of the images that may run (empty: any). A worker applies its own list again.
    cap_drop: tuple[str, ...] = ()
    cap_add: tuple[str, ...] = ()
    allowed_images: tuple[str, ...] = ()
    # what this host offers when it runs a worker (``cloudai worker start`` flags override)
    worker_cpus: str = ""  # default: all cores
    worker_memory: str = ""  # default: all memory
    worker_gpus: str = "auto"  # auto | none | 0,1
    worker_labels: str = ""  # gpu=a100,zone=b
    worker_concurrency: int = 16
    fairshare_halflife_s: float = 7 * 86400.0  # fair-share usage halves over this (Slurm's default: 7 days)
    # the master's URL: when set, the CLI's user commands go through its API with this token
    api_url: str | None = None
    token: str | None = dataclasses.field(default=None, repr=False)
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
            stop_grace_s=_float(env, "CLOUDAI_STOP_GRACE", base.stop_grace_s),
            placement_policy=policy,
            docker_network=env.get("CLOUDAI_DOCKER_NETWORK") or None,
            pids_limit=_int(env, "CLOUDAI_PIDS_LIMIT", base.pids_limit),
            cap_drop=_caps(env, "CLOUDAI_CAP_DROP", allow_all=True),
            cap_add=_caps(env, "CLOUDAI_CAP_ADD", allow_all=False),
            allowed_images=_list(env, "CLOUDAI_ALLOWED_IMAGES"),
            worker_cpus=env.get("CLOUDAI_WORKER_CPUS", ""),
            worker_memory=env.get("CLOUDAI_WORKER_MEMORY", ""),
            worker_gpus=env.get("CLOUDAI_WORKER_GPUS") or base.worker_gpus,
            worker_labels=env.get("CLOUDAI_WORKER_LABELS", ""),
            worker_concurrency=_int(env, "CLOUDAI_WORKER_CONCURRENCY", base.worker_concurrency),
            fairshare_halflife_s=_float(env, "CLOUDAI_FAIRSHARE_HALFLIFE", base.fairshare_halflife_s),
            api_url=(env.get("CLOUDAI_API_URL") or "").rstrip("/") or None,
            token=env.get("CLOUDAI_TOKEN") or None,
            default_quota_tasks=_optional_whole(env, "CLOUDAI_DEFAULT_QUOTA_TASKS", base.default_quota_tasks),
            default_quota_cpus=_optional_number(env, "CLOUDAI_DEFAULT_QUOTA_CPUS", base.default_quota_cpus),
            default_quota_memory=_size(env, "CLOUDAI_DEFAULT_QUOTA_MEMORY", base.default_quota_memory,
                                       allow_none=True),
            default_quota_gpus=_optional_whole(env, "CLOUDAI_DEFAULT_QUOTA_GPUS", base.default_quota_gpus),
            default_quota_waiting=_optional_whole(env, "CLOUDAI_DEFAULT_QUOTA_WAITING", base.default_quota_waiting),
            max_timeout_s=_duration(env, "CLOUDAI_MAX_TIMEOUT", base.max_timeout_s),
            default_timeout_s=_duration(env, "CLOUDAI_DEFAULT_TIMEOUT", base.default_timeout_s),
            pids_reserve=_int(env, "CLOUDAI_PIDS_RESERVE", base.pids_reserve),
            task_disk=_size(env, "CLOUDAI_TASK_DISK", base.task_disk) or 0,
            max_task_disk=_size(env, "CLOUDAI_MAX_TASK_DISK", base.max_task_disk) or 0,
            disk_min_free=_size(env, "CLOUDAI_DISK_MIN_FREE", base.disk_min_free) or 0,
            disk_check_interval_s=_float(env, "CLOUDAI_DISK_CHECK_INTERVAL", base.disk_check_interval_s) or 5.0,
            allowed_registries=_list(env, "CLOUDAI_ALLOWED_REGISTRIES") or base.allowed_registries,
            reserved_label_prefixes=(_list(env, "CLOUDAI_RESERVED_LABEL_PREFIXES")
                                     if "CLOUDAI_RESERVED_LABEL_PREFIXES" in env else base.reserved_label_prefixes),
        )

    def replace(self, **changes: object) -> Settings:
        """A copy with CLI overrides applied; ``None`` values leave a field as it is."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]
