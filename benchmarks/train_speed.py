"""Training-step speed of the default recipe's three phases in fp32 and under bf16 autocast, at one
or more torch thread counts, side by side in one process: the numbers behind `fastblt train
--precision auto`, and what a second thread buys.

    python benchmarks/train_speed.py [--seconds 20] [--threads 1,2]

Each phase (entropy LM, BLT-D with the shipped entropy model patching, baseline byte LM) takes
--warmup steps per configuration (precision x threads) first (the first steps of a process run up
to ~1.7x slower: allocator, oneDNN primitive caches), then the configurations' steps alternate, each
until it has had at least --seconds and 2 steps. The steps are `train.train_step`, the trainer's own.
Writes benchmarks/results/train_speed.{json,md,png}; the CPU is in the table (the ratios depend on it).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import click
import torch

from fastblt.formats.checkpoint import load_checkpoint
from fastblt.model.blt import BltModel, EntropyModel
from fastblt.model.config import VOCAB_SIZE
from fastblt.train.corpus import Corpus
from fastblt.train.loop import (
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


Config = tuple[str, int]  # (precision, torch threads)


def measure(
    model: torch.nn.Module,
    pc: PhaseConfig,
    step_fn: StepFn,
    corpus: Corpus,
    seconds: float,
    configs: list[Config],
    warmup: int = 3,
) -> list[dict]:
    """Median seconds per step of each configuration, alternating steps so that drift hits all alike."""
    model.train()
    opt = make_optimizer(model, pc)
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    times: dict[Config, list[float]] = {c: [] for c in configs}

    def one(c: Config) -> float:
        x = corpus.sample(pc.batch, pc.seq_bytes, gen)
        torch.set_num_threads(c[1])
        t0 = time.perf_counter()
        train_step(model, opt, replace(pc, bf16=c[0] == "bf16"), step_fn, x, gen)
        return time.perf_counter() - t0

    for _ in range(warmup):
        for c in configs:
            one(c)
    need = lambda c: sum(times[c]) < seconds or len(times[c]) < 2  # noqa: E731
    while any(need(c) for c in configs):
        for c in filter(need, configs):
            times[c].append(one(c))
    torch.set_num_threads(threads)
    rows = []
    for (precision, n), t in times.items():
        per_step = sorted(t)[len(t) // 2]  # median: robust to a stray slow step
        rows.append({"precision": precision, "threads": n, "steps": len(t), "s_per_step": per_step})
        rows[-1]["bytes_per_s"] = pc.batch * pc.seq_bytes / per_step
    for r in rows:  # against the first configuration (fp32 on the fewest threads by default)
        r["speed_vs_first"] = rows[0]["s_per_step"] / r["s_per_step"]
    return rows


def render(res: dict) -> str:
    cpu = res["cpu"]
    native, auto = ("yes", "bf16") if cpu["native_bf16"] else ("no", "fp32")
    first = res["rows"][0]["configs"][0]
    lines = [
        "# Training-step speed: fp32 against bf16 autocast, by thread count",
        "",
        f"`{res['command']}` on {cpu['model']} ({cpu['cores']} cores, torch sees {cpu['isa']}, native bf16: "
        f"{native}), torch {res['torch']}. Median seconds per optimizer step of the default recipe; the "
        f"configurations' steps alternate in one process. Speed is against {first['precision']} on "
        f"{first['threads']} thread(s). `fastblt train --precision auto` picks {auto} on this CPU.",
        "",
        "| phase | batch x bytes | precision | threads | s/step | bytes/s | speed |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        for c in r["configs"]:
            lines.append(
                f"| {r['phase']} | {r['batch']} x {r['seq_bytes']} | {c['precision']} | {c['threads']} | "
                f"{c['s_per_step']:.2f} | {c['bytes_per_s']:.0f} | {c['speed_vs_first']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["phase"] for r in res["rows"]]
    labels = [f"{c['precision']}, {c['threads']} thread(s)" for c in res["rows"][0]["configs"]]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for i, label in enumerate(labels):
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [r["configs"][i]["bytes_per_s"] for r in res["rows"]], width=width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("training bytes/s")
    ax.set_title(f"{res['cpu']['model']} ({res['cpu']['isa']})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _list(kind, choices=None):
    def parse(ctx, param, value: str):
        items = [v.strip() for v in value.split(",") if v.strip()]
        try:
            out = [kind(v) for v in items]
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected a comma-separated list") from None
        bad = [v for v in out if (choices and v not in choices) or (kind is int and v < 1)]
        if bad or not out:
            raise click.BadParameter(f"{value!r}: {', '.join(map(str, bad)) or 'empty'} not allowed")
        return out

    return parse


@click.command()
@click.option("--seconds", type=float, default=20.0, show_default=True, help="Timed steps per phase and configuration.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed steps first, each.")
@click.option("--precisions", default="fp32,bf16", show_default=True, callback=_list(str, PRECISIONS))
@click.option("--threads", default="1", show_default=True, callback=_list(int), help="Comma-separated thread counts.")
def main(seconds: float, warmup: int, precisions: list[str], threads: list[int]) -> None:
    configs = [(p, n) for n in threads for p in precisions]
    corpus = Corpus.load(include_tests=True)
    rows = []
    for name, model, pc, step_fn in phases():
        print(f"train_speed: {name} ...", file=sys.stderr, flush=True)
        got = measure(model, pc, step_fn, corpus, seconds, configs, warmup)
        print(
            f"train_speed: {name}: "
            + ", ".join(f"{c['precision']} x{c['threads']} {c['speed_vs_first']:.2f}" for c in got),
            file=sys.stderr,
            flush=True,
        )
        rows.append({"phase": name, "batch": pc.batch, "seq_bytes": pc.seq_bytes, "configs": got})
    command = " ".join(["python benchmarks/train_speed.py", *sys.argv[1:]])
    res = {"command": command, "cpu": cpu_description(), "torch": torch.__version__, "seconds": seconds}
    res |= {"warmup": warmup, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_speed.json").write_text(json.dumps(res, indent=2))
    (RESULTS / "train_speed.md").write_text(render(res))
    plot(res, RESULTS / "train_speed.png")
    print(render(res))


if __name__ == "__main__":
    main()
