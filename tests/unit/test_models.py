from __future__ import annotations

import pytest

from cloudai.errors import ValidationError
from cloudai.models import (
    GiB,
    MiB,
    Resources,
    Task,
    TaskError,
    TaskStatus,
    join_command,
    parse_cpus,
    parse_duration,
    parse_gpus,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512m", 512 * MiB),
        ("4g", 4 * GiB),
        ("4G", 4 * GiB),
        ("4GiB", 4 * GiB),
        ("4GB", 4 * GiB),
        ("4gb", 4 * GiB),
        ("1.5g", int(1.5 * GiB)),
        ("64MiB", 64 * MiB),
        ("100k", 100 * 1024),
        ("1t", 1024 * GiB),
        ("67108864", 64 * MiB),  # a bare number is bytes, as with docker run -m
        ("6291456", 6 * MiB),
        ("4096b", 4096),  # with a unit, any size (Resources.parse refuses memory under 6m)
        (" 2g ", 2 * GiB),
        (67108864, 64 * MiB),  # a JSON number is bytes too
        (2.0 * GiB, 2 * GiB),
    ],
)
def test_sizes_as_users_type_them(text: str | float, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(("value", "field", "message"), [
    ("512", "memory", "invalid memory '512': a bare number is bytes, and Docker needs at least 6m; did you mean 512g?"),
    (" 4.0 ", "memory", "invalid memory ' 4.0 ': a bare number is bytes, and Docker needs at least 6m; "
                        "did you mean 4.0g?"),
    (0.25, "memory", "invalid memory 0.25: a bare number is bytes, and Docker needs at least 6m; did you mean 0.25g?"),
    ("10", "storage", "invalid storage '10': a bare number is bytes, and a size under 6m needs its unit (512k); "
                      "did you mean 10g?"),
    ("6291455", "memory", "invalid memory '6291455': a bare number is bytes, and Docker needs at least 6m"),
])
def test_a_bare_number_below_6m_is_refused_with_the_unit_it_lacked(value: str | float, field: str,
                                                                   message: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_size(value, field)
    assert str(err.value) == message


@pytest.mark.parametrize("bad", ["", "lots", "4x", "-1g", "0", "0m", "4 g b", "g4", "1e400", "nan", "4gigs"])
def test_bad_sizes_name_field_value_and_forms(bad: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_size(bad, "memory")
    message = str(err.value)
    assert "memory" in message and repr(bad) in message and "512m" in message


@pytest.mark.parametrize(("text", "cpus"), [("2", 2.0), ("0.5", 0.5), (1, 1.0), ("16", 16.0)])
def test_cpus(text: str, cpus: float) -> None:
    assert parse_cpus(text) == cpus


@pytest.mark.parametrize("bad", ["0", "-1", "two", "", "inf", "nan", "2000", "0.0000001"])
def test_bad_cpus(bad: str) -> None:
    with pytest.raises(ValidationError, match="cpus"):
        parse_cpus(bad)


@pytest.mark.parametrize(("text", "gpus"), [("0", 0), ("1", 1), ("8", 8), ("1.0", 1), (2, 2)])
def test_gpus(text: str, gpus: int) -> None:
    assert parse_gpus(text) == gpus


@pytest.mark.parametrize("bad", ["-1", "0.5", "many", "65", ""])
def test_bad_gpus_say_whole_numbers(bad: str) -> None:
    with pytest.raises(ValidationError, match="whole number of GPUs"):
        parse_gpus(bad)


def test_resources_parse_defaults_and_minimum_memory() -> None:
    res = Resources.parse(cpus="2", memory="4g", gpus="1", storage="10g")
    assert res == Resources(2.0, 4 * GiB, 1, 10 * GiB)
    assert Resources.parse() == Resources(1.0, GiB, 0, None)
    with pytest.raises(ValidationError, match="at least 6m"):
        Resources.parse(memory="1m")
    with pytest.raises(ValidationError, match="did you mean 4g"):
        Resources.parse(memory="4")
    with pytest.raises(ValidationError, match="storage"):
        Resources.parse(storage="lots")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("30s", 30.0), ("30m", 1800.0), ("2h", 7200.0), ("1h30m", 5400.0), ("1d", 86400.0),
     (None, None), ("0", None), (45, 45.0)],
)
def test_durations(text: str | None, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["soon", "10x", "-5", "1h 30q", "m"])
def test_bad_durations(bad: str) -> None:
    with pytest.raises(ValidationError, match="timeout"):
        parse_duration(bad)


def test_lifecycle_transitions() -> None:
    S = TaskStatus
    assert S.QUEUED.can_become(S.RUNNING)
    assert S.RUNNING.can_become(S.COMPLETED)
    assert S.RUNNING.can_become(S.PENDING)  # a lost task retried as a new attempt
    assert not S.COMPLETED.can_become(S.FAILED)
    assert not S.PENDING.can_become(S.RUNNING)
    assert all(s.terminal for s in (S.COMPLETED, S.FAILED, S.CANCELLED, S.TIMEOUT, S.LOST))
    assert not any(s.terminal for s in (S.PENDING, S.QUEUED, S.RUNNING))


def test_join_command() -> None:
    assert join_command([]) is None
    assert join_command(["echo a; echo b"]) == "echo a; echo b"
    assert join_command(["sh", "-c", "echo a; exit 3"]) == "sh -c 'echo a; exit 3'"


def test_task_doc_round_trip() -> None:
    task = Task(task_id="t1", user_id="u", docker_image="img", error=TaskError("X", "y"), gpu_ids=["0"])
    again = Task.from_doc(task.to_doc())
    assert again == task
    assert again.created_at.tzinfo is not None


def test_a_record_with_the_seeds_gb_floats_reads_as_bytes() -> None:
    doc = Task(task_id="t1", user_id="u", docker_image="img").to_doc()
    assert doc["memory_bytes"] == GiB and doc["storage_bytes"] is None and "req_memory" not in doc
    del doc["memory_bytes"], doc["storage_bytes"]
    old = Task.from_doc({**doc, "req_memory": 0.25, "req_storage": 10.0})
    assert (old.memory_bytes, old.storage_bytes) == (256 * MiB, 10 * GiB)
    assert old.resources == Resources(1.0, 256 * MiB, 0, 10 * GiB)
    # an old record updated since (SQLite keeps the keys it had): the bytes win
    assert Task.from_doc({**doc, "req_memory": 0.25, "memory_bytes": 64 * MiB}).memory_bytes == 64 * MiB
    assert Task.from_doc({**doc, "req_memory": 0.25, "req_storage": None}).storage_bytes is None


def test_task_doc_is_what_asdict_gives_and_shares_nothing_mutable() -> None:
    import dataclasses

    task = Task(task_id="t1", user_id="u", docker_image="busybox", command="true", env={"A": "1"},
                labels={"l": "v"}, gpu_ids=["0", "1"], constraints={"pool": "x"}, after=["t0"],
                error=TaskError("Failed", "exit 2"))
    expected = dataclasses.asdict(task)
    expected["status"] = task.status.value
    doc = task.to_doc()
    assert doc == expected and list(doc) == list(expected)
    doc["env"]["B"] = "2"
    doc["gpu_ids"].append("2")
    assert task.env == {"A": "1"} and task.gpu_ids == ["0", "1"]
    assert Task.from_doc(task.to_doc()) == task
