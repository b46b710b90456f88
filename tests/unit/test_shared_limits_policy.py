"""Issue 23, the worker's side, pure parts: registry policy and pull messages, the PID budget, the disk policy's
parsing, quotas over the operator's defaults, reserved label prefixes, and the settings that carry them."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cloudai import imagepolicy, limits, pidbudget
from cloudai.diskguard import DiskGuard, driver_bounds_size, mount_of, over_budget
from cloudai.errors import ConfigError, ValidationError
from cloudai.models import GiB, MiB, Quota
from cloudai.placer import Placer
from cloudai.quotapolicy import effective, running_limits
from cloudai.settings import Settings

DEFAULT = Settings().allowed_registries


def no_dns(name: str) -> list[str]:
    raise AssertionError(f"{name} was resolved, but an exact entry or an address needs no lookup")


@pytest.mark.parametrize(("image", "registry"), [
    ("busybox", "docker.io"), ("cloudai/busybox:local", "docker.io"), ("library/busybox@sha256:" + "a" * 64,
                                                                        "docker.io"),
    ("ghcr.io/org/app:1.2", "ghcr.io"), ("localhost/x", "localhost"), ("localhost:5000/a/b", "localhost:5000"),
    ("127.0.0.1:18201/probe:1", "127.0.0.1:18201"), ("REGISTRY.example.com/team/app", "registry.example.com"),
    ("index.docker.io/library/busybox", "docker.io"), ("registry-1.docker.io/x/y", "docker.io"),
])
def test_registry_of_follows_dockers_rule(image: str, registry: str) -> None:
    assert imagepolicy.registry_of(image) == registry


def test_default_registries_allow_hub_style_names_without_dns() -> None:
    for image in ("busybox", "cloudai/busybox:local", "ghcr.io/org/app:1", "nvcr.io/nvidia/pytorch:24.01-py3"):
        assert imagepolicy.refusal(image, DEFAULT, no_dns) is None


@pytest.mark.parametrize(("image", "words"), [
    ("127.0.0.1:18201/probe:1", "its registry 127.0.0.1:18201 is not allowed on this cluster; allowed registries "
                                "(CLOUDAI_ALLOWED_REGISTRIES): docker.io, ghcr.io, quay.io, nvcr.io"),
    ("localhost:5000/x", "its registry localhost:5000 is not allowed"),
    ("evil.example/x", "its registry evil.example is not allowed"),
])
def test_registries_outside_the_list_are_refused(image: str, words: str) -> None:
    assert words in (imagepolicy.refusal(image, DEFAULT, no_dns) or "")


@pytest.mark.parametrize(("image", "kind"), [
    ("127.0.0.1:5000/x", "loopback"), ("127.8.9.1/x", "loopback"), ("localhost:5000/x", "loopback"),
    ("169.254.169.254/latest", "link-local"), ("10.1.2.3:5000/x", "private"), ("172.16.0.9/x", "private"),
    ("192.168.1.1:443/x", "private"), ("0.0.0.0:80/x", "private"),
])
def test_any_registry_still_refuses_local_addresses(image: str, kind: str) -> None:
    why = imagepolicy.refusal(image, ["*"], no_dns)
    assert why is not None and f"is a {kind} address" in why and "CLOUDAI_ALLOWED_REGISTRIES" in why


def test_a_name_is_judged_by_what_it_resolves_to_and_an_exact_entry_wins() -> None:
    assert "is a private address" in (imagepolicy.refusal("reg.corp/x", ["*"], lambda _: ["10.0.0.5"]) or "")
    assert "is a loopback address" in (imagepolicy.refusal("reg.corp/x", ["*.corp"], lambda _: ["::1"]) or "")
    assert imagepolicy.refusal("reg.corp/x", ["*"], lambda _: ["93.184.216.34"]) is None
    assert imagepolicy.refusal("reg.corp/x", ["reg.corp"], no_dns) is None  # the operator named it
    assert imagepolicy.refusal("127.0.0.1:5000/x", ["127.0.0.1:5000"], no_dns) is None
    assert imagepolicy.refusal("127.0.0.1:5001/x", ["127.0.0.1:5000"], no_dns) is not None
    with pytest.raises(ValidationError) as err:
        imagepolicy.check("127.0.0.1:9/x:1", DEFAULT, no_dns)
    assert err.value.exit_code == 2 and err.value.field == "image"


@pytest.mark.parametrize(("status", "message", "said"), [
    (404, "<html>secret body of the registry</html>", "not found"),
    (500, 'error parsing HTTP 404 response body: invalid character \'S\': "SECRET-BODY {}"', "not found"),
    (500, 'manifest for 127.0.0.1:1/x:1 not found: manifest unknown: <body>', "not found"),
    (500, 'Head "https://r/v2/x/manifests/1": unauthorized: authentication required', "unauthorized"),
    (500, 'Get "https://r.invalid/v2/": dial tcp: lookup r.invalid on 10.0.0.2:53: no such host',
     "registry unreachable"),
    (500, 'Get "http://127.0.0.1:9/v2/": dial tcp 127.0.0.1:9: connect: connection refused', "registry unreachable"),
    (500, "toomanyrequests: You have reached your pull rate limit", "rate limit"),
    (500, "something else entirely: 10.0.0.2", "the registry refused it"),
])
def test_pull_failures_in_fixed_words(status: int, message: str, said: str) -> None:
    reason = imagepolicy.pull_reason(status, message)
    assert said in reason
    assert "10.0.0.2" not in reason and "secret" not in reason.lower() and "<" not in reason


def test_pid_budget_shares_the_host_over_the_slots(tmp_path: Path) -> None:
    assert pidbudget.per_task(4096, 32768, 8192, 16) == 1536  # 16 x 4096 would be twice pid_max
    assert pidbudget.per_task(4096, 4194304, 8192, 16) == 4096  # a big host: the setting
    assert pidbudget.per_task(4096, None, 8192, 16) == 4096  # not Linux: the setting
    assert pidbudget.per_task(4096, 1000, 8192, 4) == 1  # nothing to spare: still a valid limit
    for slots in (1, 3, 16, 100):
        assert pidbudget.per_task(4096, 32768, 8192, slots) * slots <= 32768 - 8192
    (tmp_path / "pid_max").write_text("32768\n")
    (tmp_path / "threads").write_text("15000\n")
    assert pidbudget.host_limit(tmp_path / "pid_max", tmp_path / "threads") == 15000
    assert pidbudget.host_limit(tmp_path / "pid_max", tmp_path / "none") == 32768
    assert pidbudget.host_limit(tmp_path / "none", tmp_path / "none") is None


def test_which_drivers_bound_a_writable_layer(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw,relatime 0 0\n/dev/vdb /var/lib/docker xfs rw,prjquota 0 0\n"
                      "/dev/vdc /var/lib/docker/volumes ext4 rw 0 0\n")
    assert mount_of("/var/lib/docker", mounts) == ("xfs", {"rw", "prjquota"})
    assert mount_of("/var/lib/docker/vfs/dir", mounts) == ("xfs", {"rw", "prjquota"})
    assert mount_of("/var/lib/dockerx", mounts) == ("ext4", {"rw", "relatime"})
    assert mount_of("/x", tmp_path / "absent") is None
    assert driver_bounds_size("overlay2", ("xfs", {"rw", "prjquota"}))
    assert driver_bounds_size("vfs", ("xfs", {"pquota"}))
    assert not driver_bounds_size("overlay2", ("xfs", {"rw"}))
    assert not driver_bounds_size("vfs", ("ext4", {"rw"}))
    assert not driver_bounds_size("overlay2", None)
    assert driver_bounds_size("zfs", None)


def test_disk_budget_reason_and_pressure() -> None:
    assert over_budget(GiB, GiB) is None and over_budget(5 * GiB, 0) is None
    assert (over_budget(int(3.1 * GiB), GiB) or "").startswith("disk: wrote 3.1 GiB, limit 1 GiB; the task was stopped")
    settings = Settings(task_disk=GiB, disk_min_free=GiB)
    sizes = {"e1": 2 * GiB, "e2": 10 * MiB}
    free = [10 * GiB]
    said: list[str | None] = []
    guard = DiskGuard(settings, lambda: {"e1": GiB, "e2": GiB}, lambda: sizes, "vfs", "/nonexistent",
                      free=lambda: free[0], on_pressure=said.append)
    assert not guard.quota_supported and "can't bound" in guard.describe()
    guard.check()
    assert (guard.over("e1") or "").startswith("disk: wrote 2 GiB, limit 1 GiB")
    assert guard.over("e2") is None and guard.pressure() is None and said == []
    free[0] = 100 * MiB
    guard.check()
    pressed = "disk: 100 MiB free for containers, below the 1 GiB this worker keeps (CLOUDAI_DISK_MIN_FREE)"
    assert guard.pressure() == pressed and said == [pressed]
    guard.check()
    assert said == [pressed]  # said once, not every round
    free[0] = 2 * GiB
    guard.check()
    assert guard.pressure() is None and said == [pressed, None]


def test_quota_defaults_and_admin_overrides() -> None:
    plain = Settings()
    assert effective("ana", None, plain) == Quota("ana", waiting=1000, updated_at=effective(
        "ana", None, plain).updated_at)  # type: ignore[union-attr]
    assert running_limits(effective("ana", None, plain)) is None  # only waiting: placement checks nothing
    strict = Settings(default_quota_tasks=2, default_quota_gpus=1, default_quota_waiting=5)
    got = effective("ana", Quota("ana", gpus=4), strict)
    assert got is not None and (got.tasks, got.gpus, got.waiting, got.cpus) == (2, 4, 5, None)
    assert running_limits(got) is got
    assert effective("ana", None, Settings(default_quota_waiting=None)) is None


def test_reserved_label_prefixes() -> None:
    prefixes = Settings().reserved_label_prefixes
    for key in ("traefik.http.routers.x.rule", "Traefik.enable", "com.docker.compose.project", "cloudai.task_id",
                "io.kubernetes.pod.name", "com.centurylinklabs.watchtower.enable", "org.opencontainers.image.x"):
        assert limits.reserved_label_prefix(key, prefixes) is not None, key
    for key in ("team", "traefikish", "com.example.owner", "dockerfile"):
        assert limits.reserved_label_prefix(key, prefixes) is None, key


def test_settings_for_the_shared_limits() -> None:
    s = Settings.from_env({})
    assert (s.default_quota_tasks, s.default_quota_waiting, s.max_timeout_s, s.default_timeout_s) == (
        None, 1000, 7 * 86400.0, 0.0)
    assert (s.task_disk, s.max_task_disk, s.disk_min_free, s.pids_reserve) == (10 * GiB, 100 * GiB, GiB, 8192)
    assert s.allowed_registries == ("docker.io", "ghcr.io", "quay.io", "nvcr.io")
    s = Settings.from_env({"CLOUDAI_DEFAULT_QUOTA_TASKS": "8", "CLOUDAI_DEFAULT_QUOTA_WAITING": "none",
                           "CLOUDAI_DEFAULT_QUOTA_MEMORY": "64g", "CLOUDAI_DEFAULT_QUOTA_CPUS": "0.5",
                           "CLOUDAI_MAX_TIMEOUT": "2d", "CLOUDAI_DEFAULT_TIMEOUT": "1h", "CLOUDAI_TASK_DISK": "512m",
                           "CLOUDAI_MAX_TASK_DISK": "0", "CLOUDAI_ALLOWED_REGISTRIES": "*",
                           "CLOUDAI_RESERVED_LABEL_PREFIXES": ""})
    assert (s.default_quota_tasks, s.default_quota_waiting, s.default_quota_memory, s.default_quota_cpus) == (
        8, None, 64 * GiB, 0.5)
    assert (s.max_timeout_s, s.default_timeout_s, s.task_disk, s.max_task_disk) == (2 * 86400.0, 3600.0,
                                                                                    512 * MiB, 0)
    assert s.allowed_registries == ("*",) and s.reserved_label_prefixes == ()
    for name, value in (("CLOUDAI_MAX_TIMEOUT", "forever"), ("CLOUDAI_TASK_DISK", "lots"),
                        ("CLOUDAI_DEFAULT_QUOTA_TASKS", "2.5")):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: value})


def test_placer_runs_passes_off_the_callers_thread_and_coalesces() -> None:
    ran: list[str] = []
    gate = threading.Event()
    done = threading.Event()

    def run_pass() -> None:
        gate.wait(10)
        ran.append(threading.current_thread().name)
        done.set()

    placer = Placer(run_pass).start()
    try:
        for _ in range(50):
            placer.request()  # returns at once: the pass waits on the gate
        assert ran == []
        gate.set()
        assert done.wait(10)
    finally:
        placer.stop()
    assert ran and all(name == "cloudai-placer" for name in ran) and len(ran) <= 2
