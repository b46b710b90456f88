"""A Redis Sentinel deployment on loopback for tests: one primary, one replica, three sentinels (Debian's
``redis-sentinel``), with a password, failing over within a few seconds. The simulated cluster
(``scripts/cluster``) runs the same deployment across hosts."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.helpers import wait_for
from tests.services import free_port, missing

SERVICE = "mymaster"
PASSWORD = "sentinel-test-pw"


class SentinelDeployment:
    """Primary, replica and three sentinels as subprocesses; :meth:`kill_primary` is the fault."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.server = shutil.which("redis-server") or missing("redis-server is not installed")
        self.sentinel_bin = shutil.which("redis-sentinel") or missing(
            "redis-sentinel is not installed (Debian package redis-sentinel)")
        self.ports = [free_port(), free_port()]  # primary, replica
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"sentinel://:{PASSWORD}@{hosts}/{SERVICE}/0"

    def _node(self, port: int, replica_of: int | None) -> None:
        folder = self.dir / f"redis-{port}"
        folder.mkdir(exist_ok=True)
        args = [str(self.server), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                "--requirepass", PASSWORD, "--masterauth", PASSWORD, "--appendonly", "yes", "--save", ""]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.nodes[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> SentinelDeployment:
        import redis

        primary, replica = self.ports
        self._node(primary, None)
        self._node(replica, primary)
        self.wait(lambda: self.node(replica).info("replication").get("master_link_status") == "up", "replication")
        for port in self.sentinel_ports:
            conf = self.dir / f"sentinel-{port}.conf"  # sentinels rewrite their own configuration
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                            f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
                            f"sentinel auth-pass {SERVICE} {PASSWORD}\n"
                            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                            f"sentinel failover-timeout {SERVICE} 4000\n")
            self.sentinels.append(subprocess.Popen([str(self.sentinel_bin), str(conf)], stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL))

        def ready() -> bool:
            try:
                for port in self.sentinel_ports:
                    sentinel = redis.Redis(port=port, decode_responses=True, socket_timeout=1)
                    if not sentinel.sentinel_slaves(SERVICE) or len(sentinel.sentinel_sentinels(SERVICE)) < 2:
                        return False
                return True
            except redis.RedisError:
                return False

        self.wait(ready, "sentinels that know the replica and each other")
        return self

    def node(self, port: int):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(port=port, password=PASSWORD, decode_responses=True, socket_timeout=2)

    def primary_port(self) -> int:
        import redis

        reply = redis.Redis(port=self.sentinel_ports[0], decode_responses=True).sentinel_get_master_addr_by_name(
            SERVICE)
        return int(reply[1])

    def kill_primary(self) -> int:
        """SIGKILL the current primary (no shutdown, no last write flushed); returns its port."""
        port = self.primary_port()
        self.nodes[port].send_signal(signal.SIGKILL)
        self.nodes[port].wait(10)
        return port

    def wait(self, check: Callable[[], object], what: str, timeout: float = 30.0) -> None:
        """Until ``check()`` is true; a node still starting (a Redis error) counts as not yet."""
        import redis

        def ok() -> bool:
            try:
                return bool(check())
            except redis.RedisError:
                return False

        wait_for(ok, timeout, 0.1, what)

    def stop(self) -> None:
        for proc in [*self.sentinels, *self.nodes.values()]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self.sentinels, *self.nodes.values()]:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
