"""Configuration from the environment (12-factor); CLI flags override through :meth:`Settings.replace`."""

from __future__ import annotations

import dataclasses
import getpass
import os
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


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}={env.get(name)!r}: use 1/true/yes or 0/false/no")


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
    # bounds on what a task may ask of its container (checked at submit and again by each worker): the highest
    # hard limit of each --ulimit name (a name not listed may not be set), and whether --ipc host is allowed
    ulimits: tuple[tuple[str, int], ...] = tuple(ulimit_bounds(DEFAULT_ULIMIT_BOUNDS).items())
    allow_host_ipc: bool = False
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
            ulimits=tuple(ulimit_bounds(env.get("CLOUDAI_ULIMITS", DEFAULT_ULIMIT_BOUNDS)).items()),
            allow_host_ipc=_bool(env, "CLOUDAI_ALLOW_HOST_IPC"),
            worker_cpus=env.get("CLOUDAI_WORKER_CPUS", ""),
            worker_memory=env.get("CLOUDAI_WORKER_MEMORY", ""),
            worker_gpus=env.get("CLOUDAI_WORKER_GPUS") or base.worker_gpus,
            worker_labels=env.get("CLOUDAI_WORKER_LABELS", ""),
            worker_volumes=env.get("CLOUDAI_WORKER_VOLUMES", ""),
            worker_concurrency=_int(env, "CLOUDAI_WORKER_CONCURRENCY", base.worker_concurrency),
            fairshare_halflife_s=_float(env, "CLOUDAI_FAIRSHARE_HALFLIFE", base.fairshare_halflife_s),
            api_url=(env.get("CLOUDAI_API_URL") or "").rstrip("/") or None,
            token=env.get("CLOUDAI_TOKEN") or None,
        )

    def replace(self, **changes: object) -> Settings:
        """A copy with CLI overrides applied; ``None`` values leave a field as it is."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]
