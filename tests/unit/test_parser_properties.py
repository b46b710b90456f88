"""Property tests (Hypothesis) of the parsers users type into: any input either parses to a value within the
bounds of cloudai.limits or is a ValidationError; never another exception, never an out-of-bounds value."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from cloudai import limits
from cloudai.errors import ValidationError
from cloudai.models import parse_cpus, parse_duration, parse_size

UNITS = {"": 1024**3, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
ANY_INPUT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="0123456789.eE+-_ kmgtbiBKMGTsmhdnaif", max_size=20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**400), max_value=10**400),
)
settings.register_profile("cloudai", max_examples=300, deadline=None)
settings.load_profile("cloudai")


@given(ANY_INPUT)
def test_size_is_in_bounds_or_refused(value: object) -> None:
    try:
        size = parse_size(value)  # type: ignore[arg-type]
    except ValidationError as exc:
        assert exc.field == "memory"
        return
    assert isinstance(size, int) and 0 <= size <= limits.MAX_MEMORY_BYTES


@given(st.integers(min_value=1, max_value=64), st.sampled_from(sorted(UNITS)), st.sampled_from(["", "b", "ib"]),
       st.booleans())
def test_size_units(number: int, unit: str, suffix: str, upper: bool) -> None:
    text = f"{number}{unit}{suffix if unit not in ('', 'b') else ''}"
    assert parse_size(text.upper() if upper else text) == number * UNITS[unit]


@given(ANY_INPUT)
def test_cpus_are_in_bounds_or_refused(value: object) -> None:
    try:
        cpus = parse_cpus(value)  # type: ignore[arg-type]
    except ValidationError as exc:
        assert exc.field == "cpus"
        return
    assert math.isfinite(cpus) and round(cpus, 9) >= 0.001 and cpus <= limits.MAX_CPUS


@given(st.floats(min_value=0.001, max_value=limits.MAX_CPUS))
def test_cpus_round_trip(cpus: float) -> None:
    assert parse_cpus(repr(cpus)) == cpus


@given(ANY_INPUT)
def test_duration_is_in_bounds_or_refused(value: object) -> None:
    try:
        seconds = parse_duration(value)  # type: ignore[arg-type]
    except ValidationError as exc:
        assert exc.field == "timeout"
        return
    assert seconds is None or (math.isfinite(seconds) and 0 < seconds <= limits.MAX_TIMEOUT_S)


@given(st.integers(0, 300), st.integers(0, 59), st.integers(0, 59), st.integers(0, 59))
def test_duration_units_add_up(days: int, hours: int, minutes: int, secs: int) -> None:
    total = days * 86400 + hours * 3600 + minutes * 60 + secs
    text = f"{days}d{hours}h{minutes}m{secs}s"
    assert parse_duration(text) == (total or None)


@given(st.text(alphabet="0123456789smhd-+.e ", min_size=1, max_size=12).filter(lambda t: "-" in t))
def test_negative_durations_are_refused(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValidationError:
        return
    assert seconds is None or seconds >= 0
