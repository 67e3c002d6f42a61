"""Options several commands share."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator

import click


class Positive(click.ParamType):
    """A finite number > 0 (`minimum`: >= it instead; `maximum`: <= it too); click's FloatRange
    lets NaN through."""

    name = "number"

    def __init__(self, minimum: float | None = None, maximum: float | None = None):
        self.minimum, self.maximum = minimum, maximum

    def convert(self, value, param, ctx) -> float:
        x = value if isinstance(value, float) else click.FLOAT.convert(value, param, ctx)
        low, high = self.minimum, self.maximum
        if not math.isfinite(x) or (x < low if low is not None else x <= 0) or (high is not None and x > high):
            bound = "> 0" if low is None else f">= {low:g}"
            bound += "" if high is None else f" and <= {high:g}"
            self.fail(f"{value!r}: expected a finite number {bound}", param, ctx)
        return x


def deprecated_option(flag: str, why: str) -> Callable:
    """A hidden option that is still accepted, ignored with a one-line note on stderr saying why."""

    def note(ctx: click.Context, param: click.Parameter, value: object) -> None:
        if value is not None:
            click.echo(f"note: {flag} is no longer used ({why}); ignoring {flag} {value}", err=True)

    return click.option(flag, hidden=True, default=None, expose_value=False, callback=note, help=why)


@contextlib.contextmanager
def reader_may_leave() -> Iterator[None]:
    """Output to a pipe whose reader may stop early (`| head`): end quietly with the exit status
    of a process stopped by SIGPIPE (128 + 13), where click would exit 1 (our "a gate failed")."""
    try:
        yield
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more reaches the pipe
        sys.exit(128 + signal.SIGPIPE)
