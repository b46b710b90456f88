"""The design card's top-level folders (cli/, workers/, beat/) exist only as cloudai.cli, cloudai.workers and
cloudai.beat once installed: code that imported them by their top-level names would work in a checkout (the
repository's root is on sys.path) and break in every installed copy, or load a module twice under two names."""

from __future__ import annotations

import re

from tests.helpers import ROOT

# `from cli...` anywhere (also inside a string of code), `import cli...` where a statement starts
TOP_LEVEL = re.compile(r"(?:(?:^|[\s\"';]|\\n)from\s+|(?:^|;|\\n)\s*import\s+)(?:cli|workers|beat)(?:\.|\s|$)", re.M)


def test_no_code_imports_the_card_folders_by_their_top_level_names() -> None:
    offenders = []
    for folder in ("cloudai", "cli", "workers", "beat", "tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.is_relative_to(ROOT / "cloudai") and path.resolve() != path:
                continue  # cloudai/cli etc. are the links to the folders read on their own
            text = path.read_text(encoding="utf-8")
            offenders += [f"{path.relative_to(ROOT)}: {m.group(0).strip()}" for m in TOP_LEVEL.finditer(text)]
    assert offenders == []


def test_the_links_point_at_the_card_folders() -> None:
    for name in ("cli", "workers", "beat"):
        link = ROOT / "cloudai" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), name
