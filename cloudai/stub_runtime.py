"""An in-memory stand-in for :class:`~cloudai.runtime.DockerRuntime` (as dramatiq's StubBroker beside its real
brokers): containers that print given lines and exit with a given code, plus switches that make the engine
fail the ways a real one does (a broken log stream, a stop that errors, an engine that stops answering). It makes
the executor's failure branches fast, deterministic tests; the behaviour users rely on is proven on real Docker."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cloudai import keys
from cloudai.runtime import ContainerSpec, EngineError, ExitState, container_labels


@dataclass
class StubContainer:
    spec: ContainerSpec
    lines: list[str]
    exit_code: int
    state: str = "created"  # created | running | exited
    stops: int = 0
    kills: int = 0
    labels: dict[str, str] = field(default_factory=dict)


class StubRuntime:
    """Containers run ``program(spec)``: a list of lines and an exit code; with ``forever`` they keep running
    until stopped (SIGTERM exits 143, a kill 137)."""

    def __init__(self, lines: list[str] | None = None, exit_code: int = 0, forever: bool = False) -> None:
        self.lines = lines or []
        self.exit_code = exit_code
        self.forever = forever
        self.containers: dict[str, StubContainer] = {}
        self.fail_streams = 0  # the next N log streams raise (a reader-thread failure)
        self.fail_stops = 0  # the next N stop/kill calls raise (Docker API errors)
        self.ignore_term = False  # SIGTERM does nothing (only a kill stops it)
        self.engine_down = False  # every call that asks the engine fails as if it restarted
        self.removed: list[str] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    # -- what the executor calls ------------------------------------------------------------------------
    def ensure_image(self, image: str, policy: str = "missing") -> None:
        return None

    def create(self, spec: ContainerSpec) -> str:
        cid = f"stub{next(self._ids):060d}"
        with self._lock:
            self.containers[cid] = StubContainer(spec, list(self.lines), self.exit_code,
                                                 labels=container_labels(spec))
        return cid

    def start(self, container_id: str) -> None:
        box = self.containers[container_id]
        box.state = "running"
        if not self.forever:
            box.state = "exited"

    def stream_frames(self, container_id: str, follow: bool = True) -> Iterator[bytes]:
        self._engine()
        if self.fail_streams > 0:
            self.fail_streams -= 1
            raise ConnectionError("injected: the log stream broke")
        box = self.containers[container_id]
        return self._frames(box, follow)

    def _frames(self, box: StubContainer, follow: bool) -> Iterator[bytes]:
        for n, line in enumerate(box.lines):
            yield f"2026-01-01T00:00:{n % 60:02d}.000000000Z {line}\n".encode()
        while follow and box.state == "running" and not self.engine_down:  # the engine going away ends it
            time.sleep(0.02)

    def wait(self, container_id: str, timeout: float = 30.0) -> int | None:
        self._engine()
        box = self.containers.get(container_id)
        if box is None:
            return None
        deadline = time.monotonic() + timeout
        while box.state == "running":
            if time.monotonic() > deadline:
                raise EngineError("wait timed out")
            time.sleep(0.02)
        return box.exit_code

    def inspect(self, container_id: str) -> dict[str, Any] | None:
        box = self.containers.get(container_id)
        if box is None:
            return None
        return {"Id": container_id, "State": {"Running": box.state == "running", "ExitCode": box.exit_code,
                                              "OOMKilled": False}}

    def exit_state(self, container_id: str) -> ExitState:
        box = self.containers.get(container_id)
        return ExitState(box.exit_code if box else -1, False, "")

    def is_running(self, container_id: str) -> bool:
        box = self.containers.get(container_id)
        return bool(box and box.state == "running")

    def state(self, container_id: str) -> str:
        if self.engine_down:
            return "unknown"
        box = self.containers.get(container_id)
        if box is None:
            return "gone"
        return "running" if box.state == "running" else "exited"

    def poll(self, container_id: str) -> tuple[str, ExitState | None]:
        state = self.state(container_id)
        return state, (self.exit_state(container_id) if state == "exited" else None)

    def stop(self, container_id: str, grace_s: float) -> None:
        self._engine()
        self._fail_stop()
        box = self.containers.get(container_id)
        if box is not None and box.state == "running":
            box.stops += 1
            if not self.ignore_term:
                box.state, box.exit_code = "exited", 143

    def kill(self, container_id: str) -> None:
        self._engine()
        self._fail_stop()
        box = self.containers.get(container_id)
        if box is not None and box.state == "running":
            box.kills += 1
            box.state, box.exit_code = "exited", 137

    def remove(self, container_id: str) -> None:
        self._engine()
        with self._lock:
            if self.containers.pop(container_id, None) is not None:
                self.removed.append(container_id)

    def find(self, worker_id: str | None = None, task_id: str | None = None) -> list[dict[str, Any]]:
        out = []
        for cid, box in list(self.containers.items()):
            if worker_id is not None and box.labels.get(keys.LABEL_WORKER_ID) != worker_id:
                continue
            if task_id is not None and box.labels.get(keys.LABEL_TASK_ID) != task_id:
                continue
            out.append({"Id": cid, "Labels": dict(box.labels), "State": box.state})
        return out

    # -- what a test does -------------------------------------------------------------------------------
    def engine_restart(self) -> None:
        """The engine went away and killed every container (no live-restore); it answers again."""
        for box in self.containers.values():
            if box.state == "running":
                box.state, box.exit_code = "exited", 137

    def _engine(self) -> None:
        if self.engine_down:
            raise EngineError("injected: the Docker engine is not answering")

    def _fail_stop(self) -> None:
        if self.fail_stops > 0:
            self.fail_stops -= 1
            raise EngineError("injected: stop failed")
