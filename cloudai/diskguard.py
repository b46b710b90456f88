"""A worker's disk policy: each task's writable layer within its budget, and no new task while the disk that
Docker writes to is nearly full.

Where Docker's storage driver can bound a container's writable layer (overlay2 or vfs on xfs mounted with
project quotas, zfs, devicemapper), the executor creates containers with ``storage_opt size=`` the task's
budget and a write past it fails with "no space left". Elsewhere (vfs or overlay2 on ext4, the usual case) the
worker says so at start (its log and ``disk_quota: false`` in its registration) and this guard measures every
running container's writable layer (Docker's ``SizeRw``, one listing of this worker's containers each
``CLOUDAI_DISK_CHECK_INTERVAL``); a task past its budget (``--storage``, else ``CLOUDAI_TASK_DISK``) is stopped
with the reason ``disk: wrote 3.1 GiB, limit 1 GiB``. A task can write at most one interval's worth of disk
speed past its budget before that.

The same round reads the free space of Docker's data root: below ``CLOUDAI_DISK_MIN_FREE`` the worker is under
pressure (its record says why) and placement skips it, as it skips a draining worker, until space is back."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from cloudai.models import format_bytes
from cloudai.settings import Settings

log = logging.getLogger(__name__)

Budgets = Callable[[], dict[str, int]]  # execution id -> bytes, of the attempts running here
MOUNTS = Path("/proc/self/mounts")
_QUOTA_OPTIONS = ("prjquota", "pquota")


def mount_of(path: str, mounts: Path = MOUNTS) -> tuple[str, set[str]] | None:
    """The file system type and mount options of the mount holding ``path`` (None: not visible here)."""
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return None
    best: tuple[int, str, set[str]] | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 4:
            continue
        point = fields[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), fields[2], set(fields[3].split(",")))
    return None if best is None else (best[1], best[2])


def driver_bounds_size(driver: str, mount: tuple[str, set[str]] | None) -> bool:
    """Whether Docker's ``driver``, on the data root's ``mount``, enforces ``storage_opt size``."""
    if driver in ("zfs", "devicemapper"):
        return True
    if driver in ("overlay2", "vfs") and mount is not None:
        fstype, options = mount
        return fstype == "xfs" and any(o in options for o in _QUOTA_OPTIONS)
    return False


def over_budget(size: int, budget: int) -> str | None:
    """The reason a task that wrote ``size`` bytes is stopped, or None within ``budget``."""
    if budget <= 0 or size <= budget:
        return None
    return (f"disk: wrote {format_bytes(size)}, limit {format_bytes(budget)}; the task was stopped "
            "(write less to the container's file system, or ask for more with --storage)")


class DiskGuard:
    """One thread per worker; see the module doc. ``sizes`` lists the writable-layer size of this worker's
    running containers by execution id; ``free`` reads the free bytes of Docker's data root (None: not
    visible from here)."""

    def __init__(self, settings: Settings, budgets: Budgets, sizes: Callable[[], dict[str, int]],
                 driver: str, data_root: str, free: Callable[[], int | None] | None = None,
                 on_pressure: Callable[[str | None], None] | None = None) -> None:
        self.settings = settings
        self.budgets = budgets
        self.sizes = sizes
        self.driver = driver
        self.data_root = data_root
        self.quota_supported = driver_bounds_size(driver, mount_of(data_root))
        self.free = free or (lambda: free_bytes(data_root))
        self.on_pressure = on_pressure
        self._over: dict[str, str] = {}
        self._pressure: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def describe(self) -> str:
        """What bounds a task's disk here, for the worker's start-up log."""
        default = format_bytes(self.settings.task_disk) if self.settings.task_disk else "none"
        if self.quota_supported:
            return (f"disk: storage driver {self.driver} bounds each container's writable layer (storage_opt "
                    f"size: --storage, else CLOUDAI_TASK_DISK {default})")
        return (f"disk: storage driver {self.driver} can't bound a container's writable layer here; each task's "
                f"writes are measured every {self.settings.disk_check_interval_s:g}s and a task past its budget "
                f"(--storage, else CLOUDAI_TASK_DISK {default}) is stopped")

    # -- what the executor asks ------------------------------------------------------------------------
    def over(self, execution_id: str) -> str | None:
        """Why this attempt must stop (it wrote past its budget), or None."""
        with self._lock:
            return self._over.get(execution_id)

    def pressure(self) -> str | None:
        """Why this worker takes no new task now (its disk), or None."""
        return self._pressure

    # -- the rounds --------------------------------------------------------------------------------------
    def start(self) -> DiskGuard:
        self._thread = threading.Thread(target=self._loop, name="cloudai-disk", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.disk_check_interval_s):
            try:
                self.check()
            except Exception:  # the engine restarting, a container removed mid-listing: next round
                log.exception("disk check failed")

    def check(self) -> None:
        """One round: measure the running tasks' writable layers, then the free space."""
        budgets = self.budgets()
        over: dict[str, str] = {}
        if budgets:
            sizes = self.sizes()
            with self._lock:
                known = dict(self._over)
            for execution, budget in budgets.items():
                why = known.get(execution) or over_budget(sizes.get(execution, 0), budget)
                if why is not None:
                    if execution not in known:
                        log.warning("attempt %s: %s", execution, why)
                    over[execution] = why
        with self._lock:
            self._over = over
        self._check_free()

    def _check_free(self) -> None:
        floor = self.settings.disk_min_free
        free = self.free() if floor else None
        reason = None
        if free is not None and free < floor:
            reason = (f"disk: {format_bytes(free)} free for containers, below the {format_bytes(floor)} this worker "
                      "keeps (CLOUDAI_DISK_MIN_FREE)")
        if reason != self._pressure:
            self._pressure = reason
            if reason:
                log.warning("worker takes no new task: %s", reason)
            else:
                log.info("disk pressure over: the worker takes new tasks again")
            if self.on_pressure is not None:
                self.on_pressure(reason)


def free_bytes(path: str) -> int | None:
    """Bytes free to unprivileged writers under ``path`` (None: it isn't visible from this process)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
