"""The deployment files: the compose stack validates, with and without the GPU profile."""

from __future__ import annotations

import os
import shutil
import subprocess

import yaml  # type: ignore[import-untyped]

from tests.helpers import ROOT
from tests.services import missing


def _config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        missing("docker-compose (Debian package) is not installed")
    return subprocess.run([binary, *args, "config"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_compose_file_validates_with_gpu_profile() -> None:
    result = _config("--profile", "gpu", env={"FLOWER_BASIC_AUTH": "admin:pw"})
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert {"redis", "mongo", "server", "worker", "beat", "flower", "gpu-worker"} <= set(services)
    devices = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert "/var/run/docker.sock:/var/run/docker.sock" in str(services["worker"]["volumes"])
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "--appendonly" in services["redis"]["command"]
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "admin:pw"


def test_flower_refuses_to_start_without_a_password() -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    binary = shutil.which("docker-compose") or missing("docker-compose (Debian package) is not installed")
    result = subprocess.run([str(binary), "config"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode != 0 and "FLOWER_BASIC_AUTH" in result.stderr


def test_the_master_service_is_health_checked_on_healthz_and_published_on_localhost() -> None:
    services = yaml.safe_load(_config(env={"FLOWER_BASIC_AUTH": "admin:pw"}).stdout)["services"]
    server = services["server"]
    assert server["command"][:1] == ["server"] and "--port" in server["command"]
    assert "/healthz" in " ".join(server["healthcheck"]["test"])
    assert server["depends_on"]["mongo"]["condition"] == "service_healthy"
    published = server["ports"][0]  # docker-compose v1 writes "ip:host:container/proto", v2 a mapping
    if isinstance(published, dict):
        assert (published["host_ip"], str(published["published"]), published["target"]) == ("127.0.0.1", "8080", 8080)
    else:
        assert published.split("/")[0] == "127.0.0.1:8080:8080"
    assert server["environment"]["CLOUDAI_STORE_URL"].startswith("mongodb://")


def test_the_worker_only_compose_file_joins_a_cluster_run_elsewhere() -> None:
    cluster = {"CLOUDAI_WORKER_ID": "gpu7", "CLOUDAI_REDIS_URL": "sentinel://:pw@c1:26379,c2:26379,w1:26379/mymaster/0",
               "CLOUDAI_STORE_URL": "mongodb://db1,db2,db3/cloudai?replicaSet=rs0&w=majority"}
    result = _config("-f", "deploy/compose.worker.yml", "--profile", "gpu", env=cluster)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert set(services) == {"worker", "gpu-worker"}  # no Redis, store, master or beat on a worker host
    for service in services.values():
        assert service["environment"]["CLOUDAI_REDIS_URL"] == cluster["CLOUDAI_REDIS_URL"]
        assert service["hostname"] == "gpu7" and service["user"] == "root"
        assert "/var/run/docker.sock:/var/run/docker.sock" in str(service["volumes"])
    assert services["gpu-worker"]["command"] == ["worker", "start", "--gpus", "auto"]
    for name in cluster:  # each is required, with a message saying what to set
        without = {k: v for k, v in cluster.items() if k != name}
        env = {k: v for k, v in os.environ.items() if k not in cluster}
        refused = subprocess.run([shutil.which("docker-compose") or "docker-compose", "-f", "deploy/compose.worker.yml",
                                  "config"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                                 env={**env, **without})
        assert refused.returncode != 0 and name in refused.stderr
