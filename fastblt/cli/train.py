"""`fastblt train`: builds the plan and runs the phases (the work is in train.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from fastblt.cli.common import Positive


@click.command("train")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/default", show_default=True)
@click.option("--minutes", type=Positive(), default=135.0, show_default=True, help="Wall clock of the BLT-D phase.")
@click.option("--entropy-minutes", type=Positive(minimum=0.0), default=10.0, show_default=True)
@click.option(
    "--baseline-minutes",
    type=Positive(minimum=0.0),
    default=None,
    help="Wall clock of the plain byte-LM baseline [default: --entropy-minutes + --minutes, the BLT-D's whole "
    "training time].",
)
@click.option(
    "--phase",
    type=click.Choice(["all", "main", "entropy", "blt", "baseline", "report", "notes"]),
    default="all",
    show_default=True,
    help="main = entropy + blt + report; all = main + baseline (sequential). Run 'baseline' in a "
    "second process to train it side by side. notes = put OUT/notes.md into an existing report "
    "(re-renders REPORT.md, measures nothing).",
)
@click.option("--resume", is_flag=True, help="Continue from OUT/<phase>/train_state.pt where present.")
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option(
    "--mask-weight",
    type=Positive(minimum=0.0),
    default=None,
    help="Weight of the block-diffusion loss against next-byte loss [default: 0.3, train.DEFAULT_MASK_WEIGHT; "
    "the paper: 1].",
)
@click.option(
    "--lr",
    type=Positive(),
    default=None,
    help="Peak learning rate of the BLT-D phase [default: 6e-3, train.DEFAULT_LR; "
    "benchmarks/train_variants.py compares recipes].",
)
@click.option(
    "--baseline-lr",
    type=Positive(),
    default=None,
    help="Peak learning rate of the baseline phase [default: 3e-3, train.DEFAULT_BASELINE_LR].",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "bf16", "fp32"]),
    default="auto",
    show_default=True,
    help="Forward passes under bf16 autocast (fp32 weights and optimizer; steps ~1.2x (BLT-D) to 1.6x (byte LM) "
    "faster on CPUs with AVX512-BF16 or AMX, ~10x slower where bf16 is emulated, e.g. AVX2-only CPUs) or in "
    "fp32. auto: bf16 where /proc/cpuinfo lists avx512_bf16 or amx_bf16, else fp32. Applies to every phase; "
    "the report states what ran.",
)
@click.option(
    "--with-tests/--without-tests",
    default=None,
    help="Train on the stdlib's test directories too (19.4 MB more than the library's 11.2 MB on CPython "
    "3.11; the held-out list is the same either way) [default: with; --smoke: without]. Recorded in "
    "OUT/corpus.json: every phase of one run must agree.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="torch threads. 1 suits the side-by-side recipe (BLT-D and baseline in two processes); a phase "
    "running alone gains from more (2 threads: 1.7x faster steps on a 2-core AVX2 EPYC, "
    "benchmarks/results/train_speed.md). Recorded per sitting.",
)
@click.option("--smoke", is_flag=True, help="Tiny models on a tiny slice for a few steps (seconds).")
@click.option("--json", "as_json", is_flag=True, help="Print the report JSON on stdout.")
def train(
    out_dir: str,
    minutes: float,
    entropy_minutes: float,
    baseline_minutes: float | None,
    phase: str,
    resume: bool,
    seed: int,
    mask_weight: float | None,
    lr: float | None,
    baseline_lr: float | None,
    precision: str,
    with_tests: bool | None,
    threads: int,
    smoke: bool,
    as_json: bool,
) -> None:
    """Train the entropy model and a BLT-D on the stdlib's .py files (the embedded default)."""
    import torch
    from tqdm import tqdm

    from fastblt.bench.samples import samples_per_mode
    from fastblt.train import loop as T
    from fastblt.train.corpus import Corpus
    from fastblt.train.progress import Reporter
    from fastblt.train.report import write_report

    if phase == "notes":
        _rewrite_notes(Path(out_dir), as_json)
        return
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    reporter = Reporter(bar=tqdm, say=lambda what: click.echo(f"report: {what}", err=True))
    plan = T.smoke_plan() if smoke else T.default_plan(minutes, entropy_minutes, baseline_minutes)
    if mask_weight is not None:
        plan = dataclasses.replace(plan, blt=dataclasses.replace(plan.blt, mask_weight=mask_weight))
    if lr is not None:
        plan = dataclasses.replace(plan, blt=dataclasses.replace(plan.blt, lr=lr))
    if baseline_lr is not None:
        plan = dataclasses.replace(plan, base=dataclasses.replace(plan.base, lr=baseline_lr))
    plan = T.resolve_precision(plan, precision)
    click.echo(f"fastblt train: {_precision_words(precision, plan.blt.bf16, T.cpu_has_native_bf16())}", err=True)
    if with_tests is not None:
        plan = dataclasses.replace(plan, corpus_tests=with_tests)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _same_corpus_as_before(out, plan.corpus_tests)
    corpus = Corpus.load(limit_bytes=plan.corpus_limit_bytes, include_tests=plan.corpus_tests)
    if phase in ("all", "main", "entropy"):
        T.train_entropy(plan, corpus, out, seed, resume, reporter)
    if phase in ("all", "main", "blt"):
        T.train_blt(plan, corpus, out, seed, resume, reporter)
    if phase in ("all", "baseline"):
        T.train_baseline(plan, corpus, out, seed, resume, reporter)
    if phase in ("all", "main", "report"):
        extra = {"smoke": smoke, "threads": threads}
        report = write_report(out, plan, corpus, seed, extra, samples_per_mode, reporter)
        summary = {
            "heldout_bpb_blt_d_ar": report["blt_d"]["heldout_ar"]["bpb"],
            "heldout_bpb_baseline": (report["baseline"] or {}).get("heldout", {}).get("bpb"),
            "mean_patch_len": report["blt_d"]["mean_patch_len_heldout"],
        }
        click.echo(json.dumps(report, indent=2) if as_json else json.dumps(summary))


def _rewrite_notes(out: Path, as_json: bool) -> None:
    from fastblt.train.report import rewrite_notes

    report = rewrite_notes(out)
    md, notes = out / "REPORT.md", out / "notes.md"
    said = f"with the notes of {notes}" if "notes" in report else f"without notes ({notes} does not exist)"
    click.echo(json.dumps(report, indent=2) if as_json else f"{md}: re-rendered {said}")


def _precision_words(asked: str, bf16: bool, native: bool) -> str:
    """The line that says which precision the phases run in, and why (stderr, before any work)."""
    what = "bf16 autocast forward passes" if bf16 else "fp32 forward passes"
    cpu = "this CPU has native bf16 (AVX512-BF16 or AMX)" if native else "this CPU has no native bf16"
    if asked == "auto":
        return f"{what} (--precision auto: {cpu})"
    if bf16 and not native:
        return f"{what} (as asked; {cpu}, so steps run ~10x slower than with --precision fp32)"
    return f"{what} (as asked)"


def _same_corpus_as_before(out: Path, with_tests: bool) -> None:
    """Phases of one run (and resumes) must train on the same corpus: the first call records it
    (the test directories' flag and the held-out list's digest)."""
    from fastblt.train.corpus import HELDOUT_LIST, heldout_list_digest

    record = out / "corpus.json"
    digest = heldout_list_digest()
    if not record.exists():
        record.write_text(json.dumps({"test_dirs": with_tests, "heldout_list_sha256": digest}))
        return
    before = json.loads(record.read_text())
    if before.get("test_dirs") != with_tests:
        flag = "--with-tests" if before.get("test_dirs") else "--without-tests"
        raise click.UsageError(f"{record}: this run was trained {flag}; give the same here")
    if before.get("heldout_list_sha256") != digest:
        raise click.UsageError(
            f"{record}: this run trained with another held-out list than {HELDOUT_LIST} (so on other files); "
            "start a new --out"
        )
