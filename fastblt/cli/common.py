"""Options several commands share."""

from __future__ import annotations

from collections.abc import Callable

import click


def deprecated_option(flag: str, why: str) -> Callable:
    """A hidden option that is still accepted, ignored with a one-line note on stderr saying why."""

    def note(ctx: click.Context, param: click.Parameter, value: object) -> None:
        if value is not None:
            click.echo(f"note: {flag} is no longer used ({why}); ignoring {flag} {value}", err=True)

    return click.option(flag, hidden=True, default=None, expose_value=False, callback=note, help=why)
