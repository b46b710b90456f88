"""httpx, imported without two optional imports the CLI's synchronous client never uses, each tens of ms a
command: httpx's own command-line tool (``httpx._main``, which httpx imports whenever rich and pygments are
installed: rich is ours), and trio, which httpcore imports when it is installed (selenium's dependency, in a test
environment) to support trio event loops.

The one place CloudAI names a private module of httpx: None in :data:`sys.modules` makes each import fail the way
both libraries expect it may (``try: ... except ImportError``). tests/unit/test_cli_imports.py pins that neither
is loaded by a command through the master, which still works.
"""

from __future__ import annotations

import sys

#: the modules made to fail to import
SKIPPED = ("httpx._main", "trio")

for _name in SKIPPED:
    sys.modules.setdefault(_name, None)  # type: ignore[arg-type]

import httpx  # noqa: E402

__all__ = ["SKIPPED", "httpx"]
