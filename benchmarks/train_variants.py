"""Short side-by-side training runs of BLT-D recipe variants (and the plain byte LM), to choose the
next default's recipe: each variant trains in its own one-thread process at the same time, for the
same wall clock, from the shipped default's entropy model (so no entropy phase), then reports
held-out bits per byte on the report's 128 headline windows and on the held-out code files
(every held-out file but the largest, `pydoc_data/topics.py`, which is English prose).

    python benchmarks/train_variants.py --variants default,dec4 --minutes 20

Writes benchmarks/results/train_variants.{json,md}; runs go to --out (git-ignored).
Short runs rank sample efficiency x speed at a short horizon, not the final numbers.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from fastblt.formats.checkpoint import load_checkpoint
from fastblt.model.blt import EntropyModel
from fastblt.model.config import VOCAB_SIZE
from fastblt.train.blt_d import eval_bpb
from fastblt.train.corpus import Corpus
from fastblt.train.loop import (
    PRECISIONS,
    TrainPlan,
    blt_forward,
    cpu_description,
    default_plan,
    initialised,
    resolve_precision,
    run_byte_lm,
    train_blt,
    with_precision,
)
from fastblt.train.progress import Reporter
from fastblt.train.report import latent_use

RESULTS = Path(__file__).resolve().parent / "results"
BARS = Reporter(bar=tqdm)  # a bar per phase on stderr


def _stack(plan: TrainPlan, part: str, **kw) -> TrainPlan:
    cfg = dataclasses.replace(getattr(plan.model, part), **kw)
    return dataclasses.replace(plan, model=plan.model.replace(**{part: cfg}))


def _local(plan: TrainPlan, **kw) -> TrainPlan:
    """The same change to the local encoder and decoder, at once (their dims must match)."""
    m = plan.model
    local = {part: dataclasses.replace(getattr(m, part), **kw) for part in ("encoder", "decoder")}
    return dataclasses.replace(plan, model=m.replace(**local))


def _hash(plan: TrainPlan, buckets: int) -> TrainPlan:
    return dataclasses.replace(plan, model=plan.model.replace(hash_vocab=buckets))


def _lr(plan: TrainPlan, lr: float) -> TrainPlan:
    return dataclasses.replace(plan, blt=dataclasses.replace(plan.blt, lr=lr))


def _base_lr(plan: TrainPlan, lr: float) -> TrainPlan:
    return dataclasses.replace(plan, base=dataclasses.replace(plan.base, lr=lr))


def _blt(plan: TrainPlan, **kw) -> TrainPlan:
    return dataclasses.replace(plan, blt=dataclasses.replace(plan.blt, **kw))


def _fp32(plan: TrainPlan) -> TrainPlan:
    return with_precision(plan, bf16=False)


_SHIPPED = default_plan(20, 0, 20)
_LR, _BASE_LR, _HASH = _SHIPPED.blt.lr, _SHIPPED.base.lr, _SHIPPED.model.hash_vocab
_GLR, _WIN = _SHIPPED.blt.global_lr_mult, _SHIPPED.model.decoder.window
_NGRAMS = _SHIPPED.model.hash_sizes

# name -> (what it changes from the shipped recipe, plan edit). "baseline*" train the plain byte LM.
# Rows of earlier runs keep the names and descriptions they ran under (results/train_variants.md).
VARIANTS: dict[str, tuple[str, Callable[[TrainPlan], TrainPlan]]] = {
    "default": ("the shipped recipe", lambda p: p),
    "recipe-2026-11": (
        f"the recipe shipped until 2026-12-02: BLT-D peak lr 1.5e-3 ({_LR:g}), 2048 hash buckets ({_HASH})",
        lambda p: _lr(_hash(p, 2048), 1.5e-3),
    ),
    "hash2048": (f"2048 hash buckets per n-gram size ({_HASH})", lambda p: _hash(p, 2048)),
    "lr3e-3": (f"BLT-D peak lr 3e-3 ({_LR:g})", lambda p: _lr(p, 3e-3)),
    "lr8e-3": (f"BLT-D peak lr 8e-3 ({_LR:g})", lambda p: _lr(p, 8e-3)),
    "dec4": (
        "decoder 4 layers (2), global 4 layers (5)",
        lambda p: _stack(_stack(p, "decoder", n_layers=4), "global_model", n_layers=4),
    ),
    "mask0.1": (
        "mask-loss weight 0.1 (0.3)",
        lambda p: dataclasses.replace(p, blt=dataclasses.replace(p.blt, mask_weight=0.1)),
    ),
    "fp32": ("fp32 forward passes (bf16 autocast)", _fp32),
    "hashdrop0.25": (
        f"hash n-gram rows dropped per byte with p=0.25 in training ({_SHIPPED.blt.hash_dropout:g})",
        lambda p: _blt(p, hash_dropout=0.25),
    ),
    "ngram3-5": (
        f"hash n-grams of 3-5 bytes only ({min(_NGRAMS)}-{max(_NGRAMS)})",
        lambda p: dataclasses.replace(p, model=p.model.replace(hash_sizes=(3, 4, 5))),
    ),
    "glr1": (f"global transformer at the full peak lr ({_GLR:g}x)", lambda p: _blt(p, global_lr_mult=1.0)),
    "glr0.1": (f"global transformer at 0.1x the peak lr ({_GLR:g}x)", lambda p: _blt(p, global_lr_mult=0.1)),
    **{
        f"win{w}": (f"local encoder and decoder attention window {w} ({_WIN})", lambda p, w=w: _local(p, window=w))
        for w in (512, 64, 32, 16)
    },
    "local256": (
        f"local encoder and decoder d=256, FFN 768 ({_SHIPPED.model.decoder.dim}, {_SHIPPED.model.decoder.ffn_dim}); "
        f"global 3 layers ({_SHIPPED.model.global_model.n_layers}); 4096 hash buckets ({_HASH})",
        lambda p: _hash(_stack(_local(p, dim=256, ffn_dim=768), "global_model", n_layers=3), 4096),
    ),
    "no-decnorm": (
        "no RMSNorm on the decoder's input stream, as the released models (RMSNorm)",
        lambda p: dataclasses.replace(p, model=p.model.replace(decoder_input_norm=False)),
    ),
    "library-only": (
        "training corpus without the stdlib's test directories: library code only, 11.2 MB (30.6 MB)",
        lambda p: dataclasses.replace(p, corpus_tests=False),
    ),
    "init-torch": (
        f"BLT-D with PyTorch's default init ({_SHIPPED.blt.init})",
        lambda p: _blt(p, init="torch"),
    ),
    "baseline-fp32": ("plain byte transformer, fp32 forward passes (bf16 autocast)", _fp32),
    "baseline": (f"plain byte transformer (d=256, 4 layers), peak lr {_BASE_LR:g}", lambda p: p),
    "baseline-lr1.5e-3": (f"plain byte transformer, peak lr 1.5e-3 ({_BASE_LR:g})", lambda p: _base_lr(p, 1.5e-3)),
    "baseline-lr5e-3": (f"plain byte transformer, peak lr 5e-3 ({_BASE_LR:g})", lambda p: _base_lr(p, 5e-3)),
    "baseline-init": (
        f"plain byte transformer with the fan-in scaled init ({_SHIPPED.base.init})",
        lambda p: dataclasses.replace(p, base=dataclasses.replace(p.base, init="scaled")),
    ),
}


def variant(name: str) -> tuple[str, Callable[[TrainPlan], TrainPlan]]:
    """A variant by name; `a+b` applies a's edit, then b's (a "baseline*" name only first)."""
    parts = name.split("+")
    if any(p not in VARIANTS or (i and p.startswith("baseline")) for i, p in enumerate(parts)):
        raise KeyError(name)
    edits = [VARIANTS[p][1] for p in parts]

    def edit(plan: TrainPlan) -> TrainPlan:
        for e in edits:
            plan = e(plan)
        return plan

    return "; ".join(VARIANTS[p][0] for p in parts), edit


def run_one(name: str, minutes: float, out: Path, seed: int, precision: str = "auto") -> dict:
    """One variant in this process (one thread); writes and returns OUT/NAME/variant.json."""
    torch.set_num_threads(1)
    out = out / name
    shipped = load_checkpoint("default")
    (out / "entropy").mkdir(parents=True, exist_ok=True)
    save_file(shipped.entropy_model.state_dict(), str(out / "entropy" / "model.safetensors"))
    (out / "entropy" / "result.json").write_text(json.dumps({"threshold": shipped.config.patching.threshold}))
    what, edit = variant(name)
    plan = edit(resolve_precision(default_plan(minutes, 0.0, minutes), precision))  # then the variant's edit
    corpus = Corpus.load(include_tests=plan.corpus_tests)
    if name.startswith("baseline"):
        torch.manual_seed(seed + 2)  # as train.train_baseline
        model = initialised(EntropyModel(plan.baseline, VOCAB_SIZE), plan.base)
        st = run_byte_lm("baseline", model, plan.base, plan, corpus, out / "baseline", seed + 2, False, BARS)
        forward, params = model, sum(p.numel() for p in model.parameters())
        steps, seen = st["step"], st["bytes"]
    else:
        res = train_blt(plan, corpus, out, seed, False, BARS)
        model = load_checkpoint(out / "checkpoint").eval()
        forward, steps, seen = blt_forward(model), res["steps"], res["train_bytes"]
        params = sum(v for k, v in model.num_params().items() if k != "entropy")
    windows = corpus.heldout_windows(1024, 128)
    with torch.no_grad():
        headline = eval_bpb(forward, windows)["bpb"]
        code = eval_bpb(forward, corpus.code_windows())["bpb"]
        train = eval_bpb(forward, corpus.sample(64, 1024, torch.Generator().manual_seed(0)))["bpb"]  # as the report
    use = {} if name.startswith("baseline") else latent_use(model, windows)
    row = {"variant": name, "what": what, "minutes": minutes, "params": params, "steps": steps}
    row["heldout_files"] = len(corpus.heldout_files)  # the list grew from 18 to 100 files on 2026-12-03
    phase = plan.base if name.startswith("baseline") else plan.blt
    row |= {"bf16": phase.bf16, "threads": 1, "cpu": cpu_description()}  # bytes/s depend on them
    row |= {"train_bytes": seen, "bytes_per_s": seen / (60 * minutes), "heldout_bpb": headline, "code_bpb": code}
    row["train_bpb"] = train  # 64 training windows: held-out minus this = what did not generalise
    if use:  # bits/byte lost when each byte reads the previous patch's latent / an all-zero latent
        row |= {
            "stale_latent_cost": use["bpb_stale_latent"] - headline,
            "zero_latent_cost": use["bpb_zero_latent"] - headline,
        }
    (out / "variant.json").write_text(json.dumps(row))
    return row


def render(rows: list[dict]) -> str:
    lines = [
        "# BLT-D recipe variants, side by side",
        "",
        "`python benchmarks/train_variants.py --variants A,B --minutes M`: the variants of one run train at the same "
        "time, each in its own one-thread process, for M minutes (cosine schedule over that budget), with the "
        "shipped entropy model for patching; compare rows of the same run. Held-out = the report's 128 headline "
        "windows (84% of them from `pydoc_data/topics.py`, English prose); code = up to 8 windows of every other "
        "held-out file. A variant's description names what it changes and, in parentheses, the value of the "
        "recipe shipped when it ran (the shipped recipe changed on 2026-12-02: lr 6e-3, 8192 hash buckets; "
        "and again later that day: bf16 autocast). Latent cost: held-out bits/byte added when every byte reads "
        "the previous patch's latent (stale) or an all-zero latent (zero); near 0 = the decoder ignores the "
        "global model (measured from 2026-12-02 14:00 on). Train = 64 random training windows (fixed seed, as "
        "the report); held-out minus train is the generalisation gap (measured from 2026-12-02 23:40 on). "
        "Precision: the forward passes' (recorded from 2026-12-03 on, when `--precision auto` became the default; "
        "compare bytes/s only within a run). Held-out files: the held-out list's size when the run started (runs "
        "before 2026-12-03 18:00 used the 18-file list, `fastblt/assets/heldout_files_until_2026-12-03.txt`; "
        "later runs the 100-file list, whose headline is only 40% prose).",
        "",
        "| run | minutes | variant | what | params | steps | bytes seen | bytes/s | precision | held-out files "
        "| held-out bits/byte | code bits/byte | train bits/byte | latent cost: stale | zero |",
        "|---|---:|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    cost = lambda r, k: f"{r[k]:+.3f}" if k in r else ""  # noqa: E731
    num = lambda r, k: f"{r[k]:.3f}" if k in r else ""  # noqa: E731
    precision = lambda r: {True: "bf16", False: "fp32"}.get(r.get("bf16"), "")  # noqa: E731 (not recorded before 2026-12-03)
    for r in rows:
        lines.append(
            f"| {r.get('run', '')} | {r['minutes']:g} | {r['variant']} | {r['what']} | {r['params']:,} | "
            f"{r['steps']} | {r['train_bytes']:,} | {r['bytes_per_s']:.0f} | {precision(r)} | "
            f"{r.get('heldout_files', 18)} | {r['heldout_bpb']:.3f} | "
            f"{r['code_bpb']:.3f} | {num(r, 'train_bpb')} | "
            f"{cost(r, 'stale_latent_cost')} | {cost(r, 'zero_latent_cost')} |"
        )
    return "\n".join(lines) + "\n"


@click.command()
@click.option(
    "--variants",
    default="default,dec4",
    show_default=True,
    help="Comma-separated; a+b combines two: " + ", ".join(VARIANTS),
)
@click.option("--minutes", type=float, default=20.0, show_default=True, help="Wall clock per variant.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/variants"), show_default=True)
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="auto",
    show_default=True,
    help="As `fastblt train --precision` (auto: bf16 autocast only on a CPU with native bf16); applied before "
    "the variant's own edit.",
)
@click.option("--one", hidden=True, help="Run this one variant in this process (used by the parent).")
def main(variants: str, minutes: float, out: Path, seed: int, precision: str, one: str | None) -> None:
    if one:
        run_one(one, minutes, out, seed, precision)
        return
    names = [v.strip() for v in variants.split(",") if v.strip()]
    unknown = []
    for n in names:
        try:
            variant(n)
        except KeyError:
            unknown.append(n)
    if unknown:
        raise click.BadParameter(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    out.mkdir(parents=True, exist_ok=True)
    run = time.strftime("%Y-%m-%d %H:%M")  # when the run started; names its rows
    procs = []
    for n in names:
        log = open(out / f"{n}.log", "w")  # noqa: SIM115 - closed when the child ends
        cmd = [sys.executable, __file__, "--one", n, "--minutes", str(minutes), "--out", str(out), "--seed", str(seed)]
        cmd += ["--precision", precision]
        procs.append((n, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        print(f"train_variants: {n} started (log {out / f'{n}.log'})", file=sys.stderr)
    failed = []
    for n, p, log in procs:
        if p.wait() != 0:
            failed.append(n)
        log.close()
        print(f"train_variants: {n} finished (exit {p.returncode})", file=sys.stderr)
    if failed:
        raise SystemExit(f"train_variants: {', '.join(failed)} failed; see their logs in {out}")
    rows = [json.loads((out / n / "variant.json").read_text()) | {"run": run} for n in names]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "train_variants.json"
    # earlier runs stay: rows are compared within a run
    kept = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = kept + rows
    path.write_text(json.dumps({"rows": rows}, indent=2))
    (RESULTS / "train_variants.md").write_text(render(rows))
    print(render(rows))


if __name__ == "__main__":
    main()
