"""The locks in requirements/ agree with setup.cfg (and pyproject.toml's build requirements), and with each other.

scripts/relock writes three locks with pip-tools: client.txt (``install_requires``), all.txt (the extras worker
and server) and test.txt (worker, server and test). Each names the extras it covers in its header's command line
(``--extra=NAME``). An edit of setup.cfg without a relock, or a lock edited by hand, fails here, before pip
refuses it on a fresh machine. No network: the files only."""

from __future__ import annotations

import configparser
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent.parent
LOCKS = ("client", "all", "test")
#: what each lock must cover, as scripts/relock compiles it
LOCK_EXTRAS = {"client": set(), "all": {"worker", "server"}, "test": {"worker", "server", "test"}}
PROJECT = canonicalize_name("cloudai")


@dataclass(frozen=True)
class Pin:
    name: NormalizedName
    version: Version
    hashes: tuple[str, ...]
    line: str


@dataclass(frozen=True)
class Lock:
    path: Path
    extras: frozenset[str]
    pins: dict[NormalizedName, Pin]


def read_lock(path: Path) -> Lock:
    """A pip-compile lock: the extras of its header's command line, and every ``name==version`` with its
    ``--hash`` options (on the continuation lines that follow it)."""
    text = path.read_text()
    command = next((ln for ln in text.splitlines() if ln.lstrip("# ").startswith("pip-compile ")), None)
    assert command is not None, f"{path.name}: no pip-compile command line in the header (run scripts/relock)"
    extras = frozenset(a.split("=", 1)[1] for a in shlex.split(command.lstrip("# ")) if a.startswith("--extra="))
    entries: list[tuple[str, list[str]]] = []  # (requirement, hashes)
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].replace("\\", " ").split()
        if not words:
            continue
        if not words[0].startswith("--"):
            entries.append((words[0], []))
        assert entries, f"{path.name}: an option before any requirement: {raw!r}"
        entries[-1][1].extend(w.split("=", 1)[1] for w in words if w.startswith("--hash="))
    pins: dict[NormalizedName, Pin] = {}
    for spec, hashes in entries:
        req = Requirement(spec)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{path.name}: {spec!r} is not pinned with =="
        name = canonicalize_name(req.name)
        assert name not in pins, f"{path.name}: {req.name} is pinned twice"
        pins[name] = Pin(name, Version(specs[0].version), tuple(hashes), spec)
    return Lock(path, extras, pins)


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _lines(value: str) -> list[str]:
    return [ln.strip() for ln in value.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def extras_of(cfg: configparser.ConfigParser) -> dict[str, list[Requirement]]:
    return {name: [Requirement(r) for r in _lines(value)] for name, value in cfg["options.extras_require"].items()}


def covered(cfg: configparser.ConfigParser, extras: set[str] | frozenset[str]) -> list[Requirement]:
    """What a lock of ``extras`` must pin: install_requires, each extra's requirements (an extra that names
    ``cloudai[...]`` brings those extras' in turn), and the build requirements (pip-compile --all-build-deps)."""
    declared = extras_of(cfg)
    out = [Requirement(r) for r in _lines(cfg["options"]["install_requires"])]
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    out += [Requirement(r) for r in build]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in declared, f"the extra {extra!r} is not in setup.cfg's [options.extras_require]"
        for req in declared[extra]:
            if canonicalize_name(req.name) == PROJECT:
                todo += sorted(req.extras)
            else:
                out.append(req)
    return [r for r in out if r.marker is None or r.marker.evaluate()]


@pytest.fixture(scope="module")
def locks() -> dict[str, Lock]:
    return {name: read_lock(ROOT / "requirements" / f"{name}.txt") for name in LOCKS}


@pytest.mark.parametrize("name", LOCKS)
def test_each_lock_covers_the_extras_relock_compiles_it_with(locks: dict[str, Lock], name: str) -> None:
    assert locks[name].extras == LOCK_EXTRAS[name], (
        f"requirements/{name}.txt was compiled with --extra={sorted(locks[name].extras)}, "
        f"scripts/relock compiles it with {sorted(LOCK_EXTRAS[name])}")


@pytest.mark.parametrize("name", LOCKS)
def test_every_requirement_is_pinned_within_its_specifier(locks: dict[str, Lock], name: str) -> None:
    lock, wrong = locks[name], []
    for req in covered(setup_cfg(), lock.extras):
        pin = lock.pins.get(canonicalize_name(req.name))
        if pin is None:
            wrong.append(f"{req} is not pinned")
        elif not req.specifier.contains(pin.version, prereleases=True):
            wrong.append(f"{req} but the lock pins {pin.version}")
    assert not wrong, f"requirements/{name}.txt disagrees with setup.cfg (run scripts/relock): " + "; ".join(wrong)


@pytest.mark.parametrize("name", LOCKS)
def test_every_pin_has_a_hash(locks: dict[str, Lock], name: str) -> None:
    bare = [pin.line for pin in locks[name].pins.values() if not pin.hashes]
    assert not bare, f"requirements/{name}.txt: pins without --hash (pip --require-hashes refuses them): {bare}"
    odd = [h for pin in locks[name].pins.values() for h in pin.hashes if not re.fullmatch(r"sha256:[0-9a-f]{64}", h)]
    assert not odd, f"requirements/{name}.txt: hashes that are not sha256: {odd}"


def test_the_locks_agree_on_every_version_they_share(locks: dict[str, Lock]) -> None:
    versions: dict[NormalizedName, dict[str, Version]] = {}
    for name, lock in locks.items():
        for pin in lock.pins.values():
            versions.setdefault(pin.name, {})[name] = pin.version
    differ = {pkg: by_lock for pkg, by_lock in versions.items() if len(set(by_lock.values())) > 1}
    assert not differ, f"the locks pin different versions (run scripts/relock): {differ}"


def test_a_wider_lock_holds_every_pin_of_a_narrower_one(locks: dict[str, Lock]) -> None:
    """client.txt is inside all.txt, all.txt inside test.txt: what `pip install cloudai` gets is what the image
    and the tests run."""
    for narrow, wide in (("client", "all"), ("all", "test")):
        missing = sorted(set(locks[narrow].pins) - set(locks[wide].pins))
        assert not missing, f"requirements/{wide}.txt lacks what requirements/{narrow}.txt pins: {missing}"


def test_the_all_extra_is_worker_and_server() -> None:
    extras = extras_of(setup_cfg())
    assert [(canonicalize_name(r.name), r.extras, str(r.specifier)) for r in extras["all"]] == [
        (PROJECT, {"worker", "server"}, "")], f"all = {[str(r) for r in extras['all']]}, not cloudai[worker,server]"


def test_a_package_two_extras_share_has_one_specifier() -> None:
    """celery, kombu, redis, pymongo are in both worker and server: the same bounds in both, or an install of one
    extra and of all would differ."""
    specs: dict[NormalizedName, dict[str, str]] = {}
    for extra, reqs in extras_of(setup_cfg()).items():
        for req in reqs:
            specs.setdefault(canonicalize_name(req.name), {})[extra] = str(req.specifier)
    differ = {pkg: by_extra for pkg, by_extra in specs.items() if len(set(by_extra.values())) > 1}
    assert not differ, f"setup.cfg names a package with different bounds in different extras: {differ}"


def test_the_checks_see_a_lock_that_disagrees(tmp_path: Path) -> None:
    """The parser is not vacuous: a pin outside setup.cfg's bounds, and a pin without hashes, are seen."""
    client = ROOT / "requirements" / "client.txt"
    click = read_lock(client).pins[canonicalize_name("click")]
    assert len(click.hashes) >= 1
    old = tmp_path / "client.txt"
    old.write_text(client.read_text().replace(f"click=={click.version} \\", "click==7.0 \\"))
    assert read_lock(old).pins[canonicalize_name("click")].version == Version("7.0")
    bounds = next(r for r in covered(setup_cfg(), set()) if r.name == "click").specifier
    assert bounds.contains(click.version) and not bounds.contains(Version("7.0"))
    bare = tmp_path / "bare.txt"
    bare.write_text("#    pip-compile --extra=worker --output-file=x setup.cfg\nclick==8.1.7\n    # via cloudai\n")
    assert read_lock(bare).extras == {"worker"} and read_lock(bare).pins[canonicalize_name("click")].hashes == ()
