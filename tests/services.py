"""Real services for tests. When a service is missing the test fails under CI (CI=true or
CLOUDAI_REQUIRE_SERVICES=1) and is skipped elsewhere, with the reason."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

TEST_IMAGE = os.environ.get("CLOUDAI_TEST_IMAGE", "cloudai/busybox:local")


def required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("CLOUDAI_REQUIRE_SERVICES") == "1"


def missing(what: str) -> None:
    message = f"{what}; run the tests with ./scripts/test, which installs and starts it"
    if required():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """The Redis the test script started (CLOUDAI_REDIS_URL), or one started here on a free port."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = os.environ.get("CLOUDAI_REDIS_URL", "")
        if not self.url:
            binary = shutil.which("redis-server")
            if binary is None:
                missing("redis-server is not installed")
            port = free_port()
            self.proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", tempfile.mkdtemp(prefix="cloudai-redis-")],  # not the cwd: it would load a dump.rdb there
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            self.url = f"redis://127.0.0.1:{port}/0"
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + float(os.environ.get("CLOUDAI_SERVICE_WAIT", "10"))
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError as exc:
                if time.monotonic() > deadline:
                    missing(f"Redis at {self.url} does not answer ({exc})")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def docker_client():  # type: ignore[no-untyped-def]
    import docker

    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as exc:
        missing(f"the Docker engine can't be reached ({exc})")
    try:
        client.images.get(TEST_IMAGE)
    except Exception:
        missing(f"the test image {TEST_IMAGE} is not built")
    return client


def chromium(window_size: str = "1400,900", log_browser: bool = False):  # type: ignore[no-untyped-def]
    """Headless Debian Chromium driven by selenium (chromium + chromium-driver), with the flags this machine's
    closed network needs; fails under CI when the packages are missing."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        missing("chromium and chromium-driver (Debian packages) are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary  # type: ignore[assignment]
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage", "--disable-component-update", "--disable-sync", "--no-first-run",
                f"--window-size={window_size}"):
        options.add_argument(arg)
    if log_browser:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


class PersistentRedis:
    """A private redis-server with an append-only file, so a restart keeps the streams."""

    def __init__(self, directory: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.dir = directory
        self.password = password
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server") or missing("redis-server is not installed")
        self.proc = subprocess.Popen(
            [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _pings(self.url):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def _pings(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.2).ping())
    except redis.RedisError:
        return False
