"""What the step, batching and serving benchmarks share: the machine a result came from, prompts
cut from the stdlib's own code, the targets table, and writing a result as JSON + markdown + plot.

Imported by the scripts beside it (`python benchmarks/NAME.py` puts this directory on sys.path).
"""

from __future__ import annotations

import json
import os
import platform
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def machine_meta() -> dict:
    """When and where a result was measured (ratios compare only within one such run)."""
    import onnxruntime

    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "onnxruntime": onnxruntime.__version__,
    }


def code_snippets(n: int, sources: tuple[str, ...], lengths: tuple[int, int], seed: int, tail: int) -> list[str]:
    """n snippets of stdlib code from `sources`, each starting at a line (none in the last `tail`
    bytes) and `lengths` bytes long (low inclusive, high exclusive): the same prompts on every
    machine with the same Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((root / f).read_text() for f in sources)
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        start = text.find("\n", int(rng.integers(0, len(text) - tail))) + 1
        out.append(text[start : start + int(rng.integers(*lengths))])
    return out


def targets_table(targets: list[dict]) -> list[str]:
    """The markdown table of targets: what was measured against its bound, and whether it is met."""
    lines = ["| target | measured | bound | met |", "|---|---:|---:|:-:|"]
    for t in targets:
        lines.append(f"| {t['target']} | {t['value']:.3g} | {t['bound']} | {'yes' if t['met'] else '**no**'} |")
    return lines


def save(stem: str, result: dict, render: Callable[[dict], str], plot: Callable[[dict, Path], None]) -> None:
    """benchmarks/results/STEM.{json,md,png}; prints the markdown."""
    RESULTS.mkdir(exist_ok=True)
    text = json.dumps(result, indent=2, default=str) + "\n"
    (RESULTS / f"{stem}.json").write_text(text)
    md = render(json.loads(text))  # rendered from what was saved, as a rerun of render would see it
    (RESULTS / f"{stem}.md").write_text(md)
    plot(result, RESULTS / f"{stem}.png")
    print(md)


def grouped_bars(path: Path, groups: list[str], series: list[tuple[str, list[float]]], ylabel: str,
                 title: str) -> None:  # fmt: skip
    """A bar chart: one group of bars per entry of `groups`, one bar per (label, values) series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for j, (label, values) in enumerate(series):
        ax.bar([i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))], values, width, label=label)
    ax.set_xticks(list(range(len(groups))), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
