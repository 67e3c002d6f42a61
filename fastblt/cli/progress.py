"""What commands print on stderr while slow one-time work runs (the library itself never prints)."""

from __future__ import annotations

import sys
from pathlib import Path

import click


def first_use_notice(out: Path):
    """The runtime's ExportNotice for a terminal: one line naming the cache directory and that this
    happens once, then a bar over the step graphs as they export and pass their checks."""
    from tqdm import tqdm

    click.echo(
        f"fastblt: first use of this checkpoint: exporting its step graphs to {out} "
        "(once; later runs load them from there)",
        err=True,
    )
    bars: list[tqdm] = []  # made at the first event, which knows the total (no bar without one)

    def progress(event: str, step: str, i: int, total: int, entry: dict | None) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="export", unit="graph", file=sys.stderr, leave=False))
        bar = bars[0]
        if event == "start":
            bar.set_postfix_str(step)
        elif event == "done":
            bar.update(1)
            if i + 1 == total:
                bar.close()

    return progress
