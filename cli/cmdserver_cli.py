"""``cloudai cmdserver status|stop|run``: the per-user command server that makes each command cost a fork
(:mod:`cloudai.cli.cmdserver`). The launcher starts one by itself; these are for looking at it and stopping it."""

from __future__ import annotations

import os
import time

import click

from cloudai.cli.local import LocalGroup


def register(cli: click.Group) -> None:
    """Add the ``cmdserver`` group to ``cli``."""

    @cli.group("cmdserver", cls=LocalGroup)
    def cmdserver() -> None:
        """The background process that runs your commands without an interpreter's start each.

        \b
        The first command starts it; it exits after an hour without commands (CLOUDAI_CMDSERVER_IDLE
        seconds), or when CloudAI's code changes. CLOUDAI_CMDSERVER=off runs every command in its own
        process; =manual uses a server only if you start one (`cloudai cmdserver run`).
        """

    @cmdserver.command()
    def status() -> None:
        """Whether this installation's server is running (exit code 1 if not)."""
        from cloudai.cli.cmdserver import control

        state = control(os.environ, "status")
        if state is None:
            click.echo("not running")
            raise SystemExit(1)
        up = time.time() - float(state["started"])
        click.echo(f"running: pid {state['pid']}, up {up:.0f}s, {state['commands']} commands run, {state['local']} sent"
                   f" back to run in their own process, {state['running']} running now; {state['socket']}")

    @cmdserver.command()
    def stop() -> None:
        """Stop this installation's server (commands it runs now go on to their end)."""
        from cloudai.cli.cmdserver import control

        state = control(os.environ, "stop")
        click.echo("stopped" if state is not None else "not running")

    @cmdserver.command()
    @click.option("--idle", type=float, help="Seconds without a command before it exits.  [default: 3600]")
    def run(idle: float | None) -> None:
        """Run the server in the foreground (the launcher starts one in the background by itself)."""
        import sys

        from cloudai.cli.cmdwire import server_argv

        # the same process as the one the launcher starts: a fresh interpreter, not this command's click state
        os.execv(sys.executable, server_argv(idle_s=idle))
