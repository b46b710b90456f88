"""GPU inventory of a worker host and per-GPU leases (a task holds its GPU ids exclusively)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import redis

from cloudai import keys
from cloudai.errors import ConfigError
from cloudai.models import LIVE, Task

log = logging.getLogger(__name__)

# Takes every key only when none is held by another attempt: all or nothing, atomically. ARGV: holder, TTL ms.
_ACQUIRE = """
for i, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  if v and v ~= ARGV[1] then return {k, v} end
end
for i, k in ipairs(KEYS) do redis.call('SET', k, ARGV[1], 'PX', ARGV[2]) end
return false
"""
_RELEASE = """
local n = 0
for i, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then n = n + redis.call('DEL', k) end
end
return n
"""
_REFRESH = """
local n = 0
for i, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then n = n + redis.call('PEXPIRE', k, ARGV[2]) end
end
return n
"""


def holder(task_id: str, execution_id: str) -> str:
    """What a GPU lease holds: one attempt of one task."""
    return f"{task_id}/{execution_id}"


def parse_holder(value: str) -> tuple[str, str]:
    task_id, _, execution_id = value.partition("/")
    return task_id, execution_id


def fenced_gpu_ids(client: redis.Redis, worker_id: str, gpu_ids: list[str] | None = None,
                   live: Iterable[Task] = ()) -> set[str]:
    """GPU ids of ``worker_id`` still leased by an attempt that is not a live task's current one (``live``: the
    worker's queued and running tasks): a lost attempt whose container is not known gone yet. Placement must not
    hand them out (never two tasks on one GPU); the lease goes when the container is removed, or when its TTL
    (the fencing deadline) passes. Without ``gpu_ids`` the worker's lease keys are scanned."""
    if gpu_ids is None:
        prefix = keys.gpu_lease(worker_id, "")
        gpu_ids = [_text(k)[len(prefix):] for k in client.scan_iter(match=prefix + "*", count=100)]
    if not gpu_ids:
        return set()
    values: Any = client.mget([keys.gpu_lease(worker_id, g) for g in gpu_ids])
    current = {holder(t.task_id, t.execution_id) for t in live if t.status in LIVE}
    return {g for g, v in zip(gpu_ids, values, strict=True) if v is not None and _text(v) not in current}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def detect_gpus(spec: str = "auto") -> list[str]:
    """GPU ids from ``--gpus``: ``none``, a list ``0,1``, or ``auto`` (NVML, else ``nvidia-smi -L``, else none)."""
    spec = (spec or "auto").strip().lower()
    if spec in ("none", ""):
        return []
    if spec != "auto":
        ids = [p.strip() for p in spec.split(",") if p.strip()]
        if not ids or len(set(ids)) != len(ids):
            raise ConfigError(f"--gpus {spec!r}: use auto, none, or distinct ids such as 0,1")
        return ids
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no pynvml or no driver: fall back to the CLI
        pass
    import shutil  # only a worker's start takes the inventory: a submit doesn't load these
    import subprocess

    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError) as exc:
        log.warning("nvidia-smi -L failed (%s); this worker offers no GPUs", exc)
        return []
    return parse_nvidia_smi(out)


def parse_nvidia_smi(output: str) -> list[str]:
    """Indexes from ``nvidia-smi -L`` lines such as ``GPU 0: NVIDIA H100 (UUID: GPU-...)``."""
    return [m.group(1) for m in re.finditer(r"^GPU (\d+):", output, re.MULTILINE)]


class GpuLeases:
    """Worker-side guard: before a container starts, its attempt takes a Redis lease on each GPU id (with a TTL
    the heartbeat refreshes); a GPU held by another attempt whose container may still run is never handed out
    twice, even if placement were wrong."""

    def __init__(self, client: redis.Redis, worker_id: str, ttl_s: float = 120.0) -> None:
        self.redis = client
        self.worker_id = worker_id
        self.ttl_ms = int(ttl_s * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._refresh = client.register_script(_REFRESH)

    def _keys(self, gpu_ids: Iterable[str]) -> list[str]:
        return [keys.gpu_lease(self.worker_id, g) for g in gpu_ids]

    def acquire(self, owner: str, gpu_ids: list[str], holder_is_live: Callable[[str], bool]) -> str | None:
        """Take the leases for attempt ``owner`` (see :func:`holder`); returns None on success, else a message
        naming the GPU and the task holding it. A lease of an attempt whose container is gone is taken over."""
        if not gpu_ids:
            return None
        lease_keys = self._keys(gpu_ids)
        for _ in range(len(gpu_ids) + 1):
            held = self._acquire(keys=lease_keys, args=[owner, self.ttl_ms])
            if not held:
                return None
            key, other = held
            if holder_is_live(other):
                gpu = key.rsplit(":", 1)[-1]
                return f"GPU {gpu} on worker {self.worker_id} is in use by task {parse_holder(other)[0]}"
            self._release(keys=[key], args=[other])  # stale lease: that attempt's container is gone
        return f"GPUs {','.join(gpu_ids)} on worker {self.worker_id} could not be leased"

    def refresh(self, owner: str, gpu_ids: list[str]) -> None:
        """Extend the leases' TTL (the heartbeat does, while the attempt's container may run)."""
        if gpu_ids:
            self._refresh(keys=self._keys(gpu_ids), args=[owner, self.ttl_ms])

    def release(self, owner: str, gpu_ids: list[str]) -> None:
        """Give the GPUs back; only once the attempt's container is known gone."""
        if gpu_ids:
            self._release(keys=self._keys(gpu_ids), args=[owner])

    def held(self, gpu_ids: list[str]) -> dict[str, str]:
        """Which attempt holds each of ``gpu_ids`` now."""
        if not gpu_ids:
            return {}
        values: Any = self.redis.mget(self._keys(gpu_ids))
        return {g: _text(v) for g, v in zip(gpu_ids, values, strict=True) if v is not None}
