from __future__ import annotations

import pytest

from cloudai.errors import ConfigError, redact
from cloudai.settings import Settings


def test_defaults_from_empty_env() -> None:
    s = Settings.from_env({})
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.store_url == "mongodb://localhost:27017/cloudai"
    assert s.worker_id and s.user


def test_env_and_flag_override() -> None:
    s = Settings.from_env({"CLOUDAI_REDIS_URL": "redis://r:1/2", "CLOUDAI_STORE_URL": "sqlite:///x.db",
                           "CLOUDAI_WORKER_ID": "gpu1", "CLOUDAI_USER": "ana", "CLOUDAI_HEARTBEAT_TIMEOUT": "12"})
    assert (s.redis_url, s.store_url, s.worker_id, s.user, s.heartbeat_timeout_s) == (
        "redis://r:1/2", "sqlite:///x.db", "gpu1", "ana", 12.0)
    assert s.replace(redis_url="redis://other", store_url=None).redis_url == "redis://other"
    assert s.replace(store_url=None).store_url == "sqlite:///x.db"


@pytest.mark.parametrize(("name", "value"), [("CLOUDAI_HEARTBEAT_TIMEOUT", "soon"),
                                             ("CLOUDAI_LOG_MAXLEN", "1.5"), ("CLOUDAI_PLACEMENT", "random")])
def test_bad_values_say_which_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_redact_hides_passwords() -> None:
    assert redact("redis://:secret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact("mongodb://u:pw@h/db") == "mongodb://u:***@h/db"
    assert redact("sqlite:///x.db") == "sqlite:///x.db"


def test_capabilities_and_image_allow_list() -> None:
    s = Settings.from_env({"CLOUDAI_CAP_DROP": "cap_chown, ALL", "CLOUDAI_CAP_ADD": "SYS_PTRACE",
                           "CLOUDAI_ALLOWED_IMAGES": "ghcr.io/org/*, busybox:*,"})
    assert s.cap_drop == ("CHOWN", "ALL") and s.cap_add == ("SYS_PTRACE",)
    assert s.allowed_images == ("ghcr.io/org/*", "busybox:*")
    assert Settings.from_env({}).allowed_images == ()
    with pytest.raises(ConfigError, match="CLOUDAI_CAP_ADD: unknown capability 'ALL'"):
        Settings.from_env({"CLOUDAI_CAP_ADD": "ALL"})
    with pytest.raises(ConfigError, match="CLOUDAI_CAP_DROP: unknown capability 'NET_RWA'"):
        Settings.from_env({"CLOUDAI_CAP_DROP": "NET_RWA"})


def test_log_limits_have_safe_defaults_and_read_sizes_and_durations() -> None:
    s = Settings.from_env({})
    assert (s.log_max_bytes, s.log_over_budget, s.log_max_line, s.log_redis_bytes) == (
        1024**3, "keep-running", 64 * 1024, 64 * 1024**2)
    assert (s.log_archive_retention_s, s.docker_log_max_size, s.docker_log_max_file) == (30 * 86400, 10 * 1024**2, 3)
    s = Settings.from_env({"CLOUDAI_LOG_MAX_BYTES": "5m", "CLOUDAI_LOG_OVER_BUDGET": "stop",
                           "CLOUDAI_LOG_MAX_LINE": "16k", "CLOUDAI_LOG_REDIS_BYTES": "8MiB",
                           "CLOUDAI_LOG_ARCHIVE_RETENTION": "7d12h", "CLOUDAI_DOCKER_LOG_MAX_SIZE": "0"})
    assert (s.log_max_bytes, s.log_over_budget, s.log_max_line, s.log_redis_bytes) == (
        5 * 1024**2, "stop", 16 * 1024, 8 * 1024**2)
    assert s.log_archive_retention_s == 7.5 * 86400 and s.docker_log_max_size == 0
    assert Settings.from_env({"CLOUDAI_LOG_ARCHIVE_RETENTION": "3600"}).log_archive_retention_s == 3600


@pytest.mark.parametrize(("name", "value"), [
    ("CLOUDAI_LOG_MAX_BYTES", "lots"), ("CLOUDAI_LOG_MAX_BYTES", "1k"), ("CLOUDAI_LOG_OVER_BUDGET", "kill"),
    ("CLOUDAI_LOG_MAX_LINE", "100"), ("CLOUDAI_LOG_MAX_LINE", "1g"), ("CLOUDAI_LOG_REDIS_BYTES", "-1"),
    ("CLOUDAI_LOG_ARCHIVE_RETENTION", "a month"), ("CLOUDAI_DOCKER_LOG_MAX_FILE", "0"),
])
def test_bad_log_limits_say_which_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})
