"""Commands that run in the ``cloudai`` launcher's own process, never in a command server's child
(:mod:`cloudai.cli.cmdserver`). Their click definitions say so (``cls=LocalCommand`` or ``cls=LocalGroup``), and
:func:`runs_local` asks click: there is no other list of them.

Why each is local: a service (``server``, ``worker``, ``beat``, ``flower``) is a process of its own (its signals,
its exit, its clean-up); ``login`` asks for the token with a hidden prompt, which needs the terminal as the
process's controlling terminal; ``cmdserver`` looks after the server itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import click


class Local:
    """Mixed into a click command class: the command runs in the launcher's own process."""


class LocalCommand(Local, click.Command):
    """A command that runs in the launcher's own process (``@cli.command(cls=LocalCommand)``)."""


class LocalGroup(Local, click.Group):
    """A group whose commands run in the launcher's own process (``@cli.group(cls=LocalGroup)``)."""


def resolve(args: Sequence[str]) -> click.Command | None:
    """The definition of the command that ``cloudai ARGS`` runs (the first name after the group's options); None
    when there is none or click can't parse the line (the command then says why itself)."""
    from cloudai.cli.main import cli

    ctx = click.Context(cli, info_name="cloudai", resilient_parsing=True, **cli.context_settings)
    try:
        with ctx.scope(cleanup=False):
            # click.Command's parse, not the group's: it parses the group's options and leaves the command's name
            # at the head of what is left (the group's moves the name aside, out of its public attributes)
            rest = click.Command.parse_args(cli, ctx, list(args))
            if not rest:
                return None
            return cli.resolve_command(ctx, rest)[1]
    except Exception:  # noqa: BLE001 - a line click can't parse: the command, run, says why
        return None


def runs_local(args: Sequence[str]) -> bool:
    """Whether ``cloudai ARGS`` must run in the launcher's own process (its command is a :class:`Local` one)."""
    return isinstance(resolve(args), Local)

