"""A client command ends with os._exit: what it printed is all there, and the exit status is SystemExit's."""

from __future__ import annotations

import os
import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-c", f"from cloudai.cli.shutdown import exit_now\n{code}"],
                          capture_output=True)


def test_everything_printed_arrives_and_the_status_is_kept() -> None:
    out = _run("import sys\nprint('x' * 200_000)\nprint('err', file=sys.stderr, end='')\nexit_now(3)")
    assert out.returncode == 3
    assert out.stdout == b"x" * 200_000 + b"\n" and out.stderr == b"err"


def test_none_is_success_and_a_message_is_printed_with_status_1() -> None:
    assert _run("exit_now(None)").returncode == 0
    said = _run("exit_now('Aborted: no such task')")
    assert said.returncode == 1 and said.stderr == b"Aborted: no such task\n"


def test_a_reader_that_went_away_is_no_error() -> None:
    # `cloudai logs ... | head`: the reader is gone before the output is flushed; the command ends quietly
    code = "from cloudai.cli.shutdown import exit_now\nimport time\nprint('line')\ntime.sleep(0.3)\nexit_now(4)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # output waits in the buffer
    proc = subprocess.run(f'{sys.executable} -c "{code}" | true; echo "${{PIPESTATUS[0]}}"', shell=True,
                          capture_output=True, executable="/bin/bash", env=env)
    assert proc.stdout.strip() == b"4" and proc.stderr == b""
