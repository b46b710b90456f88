"""GPU inventory of a worker host and per-GPU leases (a task holds its GPU ids exclusively)."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Callable

import redis

from cloudai import keys
from cloudai.errors import ConfigError

log = logging.getLogger(__name__)

# Takes every key only when none is held by another task: all or nothing, atomically.
_ACQUIRE = """
for i, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  if v and v ~= ARGV[1] then return {k, v} end
end
for i, k in ipairs(KEYS) do redis.call('SET', k, ARGV[1]) end
return false
"""
_RELEASE = """
local n = 0
for i, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then n = n + redis.call('DEL', k) end
end
return n
"""


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
    """Worker-side guard: before a container starts, its task takes a Redis lease on each GPU id; a GPU held
    by another live task is never handed out twice, even if placement were wrong."""

    def __init__(self, client: redis.Redis, worker_id: str) -> None:
        self.redis = client
        self.worker_id = worker_id
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)

    def acquire(self, task_id: str, gpu_ids: list[str], holder_is_live: Callable[[str], bool]) -> str | None:
        """Take the leases; returns None on success, else a message naming the GPU and the task holding it.
        A lease left by a task that is no longer live is taken over."""
        if not gpu_ids:
            return None
        lease_keys = [keys.gpu_lease(self.worker_id, g) for g in gpu_ids]
        for _ in range(len(gpu_ids) + 1):
            held = self._acquire(keys=lease_keys, args=[task_id])
            if not held:
                return None
            key, holder = held
            if holder_is_live(holder):
                gpu = key.rsplit(":", 1)[-1]
                return f"GPU {gpu} on worker {self.worker_id} is in use by task {holder}"
            self._release(keys=[key], args=[holder])  # stale lease of a finished task
        return f"GPUs {','.join(gpu_ids)} on worker {self.worker_id} could not be leased"

    def release(self, task_id: str, gpu_ids: list[str]) -> None:
        if gpu_ids:
            self._release(keys=[keys.gpu_lease(self.worker_id, g) for g in gpu_ids], args=[task_id])
