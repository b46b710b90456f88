"""CLOUDAI_REDIS_URL's forms (cloudai/redisurl.py): one Redis or a Sentinel deployment, and what Celery gets."""

from __future__ import annotations

import pytest

from cloudai.celery_app import make_app
from cloudai.errors import ConfigError
from cloudai.redisurl import SentinelTarget, celery_broker, check, parse_sentinel
from cloudai.settings import Settings

SENTINELS = "sentinel://:s%40cret@10.0.0.1:26379,10.0.0.2:26380,[fd00::3]:26381/mymaster/2"


def test_a_sentinel_url_names_the_sentinels_the_service_the_db_and_the_password() -> None:
    target = parse_sentinel(SENTINELS)
    assert target == SentinelTarget((("10.0.0.1", 26379), ("10.0.0.2", 26380), ("fd00::3", 26381)), "mymaster", 2,
                                    None, "s@cret", ":s%40cret")
    plain = parse_sentinel("sentinel://h1:26379,h2:26379/mymaster")
    assert plain is not None and (plain.db, plain.password, plain.username) == (0, None, None)


def test_one_redis_is_no_sentinel_deployment() -> None:
    for url in ("redis://localhost:6379/0", "rediss://:pw@r:6380/1", "unix:///run/redis.sock"):
        assert parse_sentinel(url) is None
        assert celery_broker(url) == (url, {})


def test_celery_gets_kombus_form_and_the_masters_name() -> None:
    broker, options = celery_broker(SENTINELS)
    assert broker == ("sentinel://:s%40cret@10.0.0.1:26379/2;sentinel://:s%40cret@10.0.0.2:26380/2;"
                      "sentinel://:s%40cret@[fd00::3]:26381/2")
    assert options["master_name"] == "mymaster"
    assert options["sentinel_kwargs"]["socket_timeout"] > 0


def test_the_celery_app_uses_sentinel_for_broker_and_results() -> None:
    app = make_app(Settings(redis_url=SENTINELS, store_url="sqlite:///x.db", worker_id="w1"))
    assert app.conf.broker_url.startswith("sentinel://") and ";" in app.conf.broker_url
    assert app.conf.broker_transport_options["master_name"] == "mymaster"
    assert app.conf.result_backend == app.conf.broker_url
    assert app.conf.result_backend_transport_options["master_name"] == "mymaster"
    mongo = make_app(Settings(redis_url=SENTINELS, store_url="mongodb://m/cloudai", worker_id="w1"))
    assert mongo.conf.result_backend_transport_options == {}


@pytest.mark.parametrize(("url", "says"), [
    ("sentinel://h1:26379,h2:26379", "master's name"),
    ("sentinel://h1,h2:26379/mymaster/0", "needs host:port"),
    ("sentinel://h1:port/mymaster/0", "no valid port"),
    ("sentinel://h1:26379/mymaster/zero", "not a number"),
    ("sentinel://:pw@/mymaster/0", "no sentinel"),
    ("sentinel://h1:26379/mymaster/0?ssl=true", "options"),
    ("sentinel://h1:26379/mymaster/0/extra", "unexpected path"),
    ("http://localhost:6379", "use redis://"),
])
def test_a_malformed_url_says_what_is_wrong_and_the_form(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match="CLOUDAI_REDIS_URL") as info:
        check(url)
    assert says in str(info.value)


def test_the_password_never_shows_in_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        check("sentinel://:hunter2@h1:26379")
    assert "hunter2" not in str(info.value) and "***" in str(info.value)
