"""Held-out learning curves of finished training runs, side by side: where does each model stop
improving? The trainer's periodic evaluation (16 evenly spaced headline windows, every 5 minutes)
is read back from each run, so nothing is recomputed and any two runs of the same setup compare.

    python benchmarks/learning_curves.py --name learning_curves \\
        --run "BLT-D=runs/default/blt" --run "byte LM=runs/default/baseline"

A run directory is a phase's folder of `fastblt train` (`OUT/blt`, `OUT/baseline`) or of
`benchmarks/train_variants.py` (`OUT/VARIANT/blt`, `OUT/VARIANT/baseline`): its `result.json`, or
else its `train_state.pt` (read with weights_only=True). Writes benchmarks/results/NAME.{json,md,png}.
The 16-window numbers are noisy (about +-0.05 between neighbouring evaluations); read the trend,
and the final 128-window numbers elsewhere for the level.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

RESULTS = Path(__file__).resolve().parent / "results"
MARKS = (15, 30, 45, 60, 75, 90, 105, 120, 135)  # minutes


def read_evals(run_dir: Path) -> dict[str, list[float]]:
    """The periodic evaluations of one run: {"elapsed": seconds, "bpb": ..., "step": ...}."""
    result, state = run_dir / "result.json", run_dir / "train_state.pt"
    if result.exists():
        evals = json.loads(result.read_text()).get("evals")
    elif state.exists():
        evals = torch.load(state, weights_only=True)["st"]["evals"]
    else:
        raise click.UsageError(f"--run {run_dir}: neither result.json nor train_state.pt there")
    if not evals or not evals.get("bpb"):
        raise click.UsageError(f"--run {run_dir}: the run recorded no periodic evaluation")
    return {k: list(map(float, evals[k])) for k in ("elapsed", "bpb", "step")}


def at_mark(evals: dict[str, list[float]], minutes: float) -> float | None:
    """bits/byte of the last evaluation at or before `minutes` (None before the first, or if the
    run ended more than one evaluation interval earlier)."""
    t = evals["elapsed"]
    i = max((j for j, s in enumerate(t) if s <= 60 * minutes), default=None)
    gap = t[1] - t[0] if len(t) > 1 else 300.0
    if i is None or 60 * minutes - t[i] > 1.5 * gap:
        return None
    return evals["bpb"][i]


def render(runs: dict[str, dict[str, list[float]]]) -> str:
    last = max(max(e["elapsed"]) for e in runs.values()) / 60
    marks = [m for m in MARKS if m <= last + 5]
    lines = [
        "# Held-out learning curves",
        "",
        "Bits/byte on the trainer's 16 periodic held-out windows (evenly spaced over the headline "
        "windows, so about as much English prose from `pydoc_data/topics.py` as the headline: 84% on the 18-file "
        "held-out list used until 2026-12-03, 41% on the 100-file list since; compare runs on one list only), the "
        "last evaluation at or before each minute mark. Noisy (about +-0.05 between neighbouring evaluations): "
        "read the trend.",
        "",
        "| run | " + " | ".join(f"{m} min" for m in marks) + " | last (min) |",
        "|---|" + "---:|" * (len(marks) + 1),
    ]
    for label, e in runs.items():
        cells = [at_mark(e, m) for m in marks]
        row = " | ".join("" if c is None else f"{c:.3f}" for c in cells)
        lines.append(f"| {label} | {row} | {e['bpb'][-1]:.3f} ({e['elapsed'][-1] / 60:.0f}) |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, e in runs.items():
        ax.plot([s / 60 for s in e["elapsed"]], e["bpb"], "o-", ms=3, label=label)
    ax.set_xlabel("training minutes (wall clock)")
    ax.set_ylabel("held-out bits / byte (16 windows)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def parse_run(spec: str) -> tuple[str, Path]:
    label, sep, path = spec.partition("=")
    if not sep or not label.strip() or not path.strip():
        raise click.BadParameter(f"{spec!r}: expected LABEL=DIR", param_hint="--run")
    return label.strip(), Path(path.strip())


@click.command()
@click.option("--run", "run_specs", multiple=True, required=True, help="LABEL=DIR, repeatable (see the docstring).")
@click.option("--name", default="learning_curves", show_default=True, help="Output file stem under --out.")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
def main(run_specs: tuple[str, ...], name: str, out: Path) -> None:
    """Tabulate and plot the periodic held-out evaluations of finished training runs."""
    if Path(name).name != name or not name:
        raise click.BadParameter(f"{name!r}: a file stem, not a path (the folder is --out)", param_hint="--name")
    dirs = dict(map(parse_run, run_specs))
    runs = {label: read_evals(path) for label, path in dirs.items()}
    out.mkdir(parents=True, exist_ok=True)
    record = {"runs": {label: {"dir": str(dirs[label]), **e} for label, e in runs.items()}}
    (out / f"{name}.json").write_text(json.dumps(record, indent=1))
    md = render(runs)
    (out / f"{name}.md").write_text(md)
    plot(runs, out / f"{name}.png")
    click.echo(md)


if __name__ == "__main__":
    main()
