"""``.gitignore``-style rules for what ``submit --upload DIR`` leaves out: the file ``.cloudaiignore`` in DIR,
else DIR's ``.gitignore`` (that one file; ``.gitignore`` files of sub-directories are not read). ``.git/`` is
always left out. Supported, as git reads them: blank lines and ``#`` comments, ``!`` to take a path back in,
a trailing ``/`` for directories only, a ``/`` at the start or in the middle to anchor a pattern at DIR (else it
matches a name at any depth), ``*``, ``?``, ``[...]`` and ``**`` (``**/x``, ``x/**``, ``a/**/b``). As with git,
a path inside a left-out directory can't be taken back in. Standard library only (the client imports it)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

IGNORE_FILES = (".cloudaiignore", ".gitignore")
ALWAYS = (".git",)


@dataclass(frozen=True)
class Rule:
    regex: re.Pattern[str]
    negated: bool
    dir_only: bool


def _translate(pattern: str) -> str:
    """A glob of the gitignore language as a regular expression over a relative path."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == len(pattern):
            out.append("/.*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 2 if pattern.startswith("[!", i) or pattern.startswith("[]", i) else i + 1)
            if end < 0:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1:end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end + 1
        elif c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def parse_rules(text: str) -> list[Rule]:
    """The rules of one ignore file's text."""
    rules = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if raw.endswith("\\ "):  # an escaped trailing space is kept
            line = raw[:-2] + " "
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        if negated or line.startswith("\\!") or line.startswith("\\#"):
            line = line[1:]
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        if not line:
            continue
        anchored = "/" in line
        line = line.lstrip("/")
        body = _translate(line)
        regex = f"^{body}$" if anchored else f"^(?:.*/)?{body}$"
        try:
            rules.append(Rule(re.compile(regex, re.DOTALL), negated, dir_only))
        except re.error:
            continue  # git ignores a pattern it can't read too
    return rules


class IgnoreRules:
    """The rules for one upload directory."""

    def __init__(self, rules: list[Rule], source: str | None = None) -> None:
        self.rules = rules
        self.source = source  # the file they came from, if any

    @classmethod
    def load(cls, root: str) -> IgnoreRules:
        for name in IGNORE_FILES:
            path = os.path.join(root, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8", errors="replace") as fh:
                    return cls(parse_rules(fh.read()), name)
        return cls([])

    def ignored(self, relpath: str, is_dir: bool) -> bool:
        """Whether ``relpath`` (relative to the upload directory, ``/``-separated) is left out; its parent
        directories were not (the walk does not enter a left-out directory)."""
        if relpath.split("/", 1)[0] in ALWAYS:
            return True
        result = False
        for rule in self.rules:
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.match(relpath):
                result = not rule.negated
        return result
