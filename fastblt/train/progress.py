"""How a long training run tells a person what it is doing.

Training and its report take a `Reporter`: a tqdm-compatible bar factory for phases and a `say`
for one-line notes. The library defaults to `SILENT`; `fastblt train` passes one that writes to
stderr, so only the CLI prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class _NoBar:
    """A progress bar that shows nothing (the tqdm calls training makes)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.n = kwargs.get("initial", 0)
        self.unit = kwargs.get("unit", "it")

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **kwargs: Any) -> None:
        return None

    def write(self, s: str) -> None:
        return None

    def close(self) -> None:
        return None


def _nothing(_: str) -> None:
    return None


@dataclass(frozen=True)
class Reporter:
    bar: Callable[..., Any] = _NoBar  # tqdm(total=, initial=, desc=, unit=, mininterval=)
    say: Callable[[str], None] = _nothing


SILENT = Reporter()
