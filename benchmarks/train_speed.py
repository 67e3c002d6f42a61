"""Training-step speed of the default recipe's three phases in fp32 and under bf16 autocast, side by
side in one process (one torch thread): the numbers behind `fastblt train --precision auto`.

    python benchmarks/train_speed.py [--seconds 20]

Each phase (entropy LM, BLT-D with the shipped entropy model patching, baseline byte LM) takes one
warm-up step per precision, then fp32 and bf16 steps alternate until each precision has had at
least --seconds and 2 steps. The steps are `train.train_step`, the trainer's own. Writes
benchmarks/results/train_speed.{json,md,png}; the CPU is in the table (the ratio depends on it).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import click
import torch

from fastblt.model.blt import BltModel, EntropyModel
from fastblt.model.checkpoint import load_checkpoint
from fastblt.model.config import VOCAB_SIZE
from fastblt.model.corpus import Corpus
from fastblt.model.train import (
    PhaseConfig,
    StepFn,
    blt_d_step,
    byte_lm_step,
    cpu_description,
    default_plan,
    initialised,
    make_optimizer,
    train_step,
)

RESULTS = Path(__file__).resolve().parent / "results"
PRECISIONS = ("fp32", "bf16")


def phases() -> list[tuple[str, torch.nn.Module, PhaseConfig, StepFn]]:
    """The default recipe's three phases, freshly initialised (speed does not depend on the weights)."""
    plan = default_plan(1.0, 1.0, 1.0)
    torch.manual_seed(0)
    entropy = initialised(EntropyModel(plan.model.entropy, VOCAB_SIZE), plan.entropy)
    shipped = load_checkpoint("default")
    blt = initialised(BltModel(plan.model.replace(patching=shipped.config.patching)), plan.blt)
    blt.entropy_model.load_state_dict(shipped.entropy_model.state_dict())
    blt.entropy_model.requires_grad_(False)
    base = initialised(EntropyModel(plan.baseline, VOCAB_SIZE), plan.base)
    return [
        ("entropy LM", entropy, plan.entropy, byte_lm_step(entropy)),
        ("BLT-D", blt, plan.blt, blt_d_step(blt, plan.blt)),
        ("baseline byte LM", base, plan.base, byte_lm_step(base)),
    ]


def measure(model: torch.nn.Module, pc: PhaseConfig, step_fn: StepFn, corpus: Corpus, seconds: float) -> dict:
    """Seconds per step for each precision, alternating steps so that drift hits both alike."""
    model.train()
    opt = make_optimizer(model, pc)
    gen = torch.Generator().manual_seed(0)
    runs = {p: replace(pc, bf16=p == "bf16") for p in PRECISIONS}
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for ppc in runs.values():  # warm-up: allocator, oneDNN primitive caches
        train_step(model, opt, ppc, step_fn, corpus.sample(pc.batch, pc.seq_bytes, gen), gen)
    while any(sum(t) < seconds or len(t) < 2 for t in times.values()):
        for p, ppc in runs.items():
            x = corpus.sample(pc.batch, pc.seq_bytes, gen)
            t0 = time.perf_counter()
            train_step(model, opt, ppc, step_fn, x, gen)
            times[p].append(time.perf_counter() - t0)
    out = {}
    for p, t in times.items():
        per_step = sorted(t)[len(t) // 2]  # median: robust to a stray slow step
        out[p] = {"steps": len(t), "s_per_step": per_step, "bytes_per_s": pc.batch * pc.seq_bytes / per_step}
    out["bf16_speedup"] = out["fp32"]["s_per_step"] / out["bf16"]["s_per_step"]
    return out


def render(res: dict) -> str:
    cpu = res["cpu"]
    lines = [
        "# Training-step speed: fp32 against bf16 autocast",
        "",
        f"`python benchmarks/train_speed.py --seconds {res['seconds']:g}` on {cpu['model']} ({cpu['cores']} cores, "
        f"torch sees {cpu['isa']}, native bf16: {'yes' if cpu['native_bf16'] else 'no'}), torch {res['torch']}, "
        f"one thread. Median seconds per optimizer step of the default recipe; fp32 and bf16 steps alternate. "
        f"`fastblt train --precision auto` picks {'bf16' if cpu['native_bf16'] else 'fp32'} on this CPU.",
        "",
        "| phase | batch x bytes | fp32 s/step | fp32 bytes/s | bf16 s/step | bf16 bytes/s | bf16 speed-up |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        f, b = r["fp32"], r["bf16"]
        lines.append(
            f"| {r['phase']} | {r['batch']} x {r['seq_bytes']} | {f['s_per_step']:.2f} | {f['bytes_per_s']:.0f} | "
            f"{b['s_per_step']:.2f} | {b['bytes_per_s']:.0f} | {r['bf16_speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["phase"] for r in res["rows"]]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, p in enumerate(PRECISIONS):
        xs = [j + (i - 0.5) * 0.38 for j in range(len(names))]
        ax.bar(xs, [r[p]["bytes_per_s"] for r in res["rows"]], width=0.38, label=p)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("training bytes/s (one thread)")
    ax.set_title(f"{res['cpu']['model']} ({res['cpu']['isa']})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


@click.command()
@click.option("--seconds", type=float, default=20.0, show_default=True, help="Timed steps per phase and precision.")
def main(seconds: float) -> None:
    torch.set_num_threads(1)
    corpus = Corpus.load(include_tests=True)
    rows = []
    for name, model, pc, step_fn in phases():
        print(f"train_speed: {name} ...", file=sys.stderr, flush=True)
        r = {
            "phase": name,
            "batch": pc.batch,
            "seq_bytes": pc.seq_bytes,
            **measure(model, pc, step_fn, corpus, seconds),
        }
        print(f"train_speed: {name}: bf16 {r['bf16_speedup']:.2f}x fp32's speed", file=sys.stderr, flush=True)
        rows.append(r)
    res = {"cpu": cpu_description(), "torch": torch.__version__, "seconds": seconds, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_speed.json").write_text(json.dumps(res, indent=2))
    (RESULTS / "train_speed.md").write_text(render(res))
    plot(res, RESULTS / "train_speed.png")
    print(render(res))


if __name__ == "__main__":
    main()
