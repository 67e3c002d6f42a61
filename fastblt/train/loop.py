"""`fastblt train`: the entropy model, then the BLT-D, and a same-budget plain byte-LM baseline.

Phases (each resumable from OUT/<phase>/train_state.pt, which holds only tensors, dicts, lists,
ints and floats so that `torch.load(weights_only=True)` reads it):
    entropy   a small byte LM, next-byte loss; then the patching threshold is chosen as the
              entropy quantile that gives a mean patch length of ~4 bytes on training windows
    blt       BLT-D with the frozen entropy model: L_clean + L_mask (train_blt_d.py)
    baseline  a plain causal byte transformer (EntropyModel code, ~3.4M params), same wall clock
    report    held-out evaluation, samples, REPORT.md + report.json + loss_curve.png (train_report.py)
A phase is budgeted by wall-clock minutes (the LR schedule follows the elapsed fraction of the
budget, so it survives resumes) or, with --smoke, by a fixed step count (deterministic).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fastblt.formats.checkpoint import save_checkpoint
from fastblt.model.blt import BltModel, EntropyModel
from fastblt.model.config import VOCAB_SIZE, BltConfig, BltDConfig, PatchingConfig, StackConfig, default_config
from fastblt.train.blt_d import blt_d_loss, eval_bpb, lm_loss, patch_batch, patch_starts_from_entropies
from fastblt.train.corpus import Corpus
from fastblt.train.init import init_weights
from fastblt.train.progress import SILENT, Reporter

TARGET_PATCH_LEN = 4.0


# ------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class PhaseConfig:
    """One training phase's optimisation and budget."""

    lr: float
    batch: int  # windows per step
    seq_bytes: int  # bytes per window (BOS prepended)
    minutes: float | None = None  # wall-clock budget; None -> max_steps
    max_steps: int | None = None
    warmup_steps: int = 100
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1
    eval_every_s: float = 300.0
    eval_windows: int = 16  # held-out 1024-byte windows for the periodic evaluation
    ckpt_every_s: float = 180.0
    max_blocks: int | None = None  # BLT-D only: blocks kept per row
    mask_weight: float = 1.0  # BLT-D only (the paper's weight; default_plan uses DEFAULT_MASK_WEIGHT)
    # Forward passes under bf16 autocast (fp32 master weights, optimizer, norms, softmax and loss):
    # bf16 matrix products run ~4x faster than fp32 on CPUs with AVX512-BF16 or AMX, and ~10x
    # slower where they are emulated (`fastblt train --precision auto` asks cpu_has_native_bf16).
    bf16: bool = True
    global_lr_mult: float = 1.0  # BLT-D only: the global transformer's lr = lr * this
    hash_dropout: float = 0.0  # BLT-D only: drop probability of each hash n-gram row per byte (BltModel.embed)
    init: str = "torch"  # "torch": PyTorch's default init; "scaled": init.init_weights (fan-in scaled)

    def __post_init__(self) -> None:
        assert (self.minutes is None) != (self.max_steps is None), "give exactly one of minutes / max_steps"


@dataclass(frozen=True)
class TrainPlan:
    """Everything `fastblt train` decides: model sizes and the three phases."""

    model: BltConfig  # patching.threshold is replaced after the entropy phase
    baseline: StackConfig
    entropy: PhaseConfig
    blt: PhaseConfig
    base: PhaseConfig
    corpus_limit_bytes: int | None = None
    corpus_tests: bool = False  # also train on the stdlib's test directories (corpus.TEST_DIRS)
    eval_windows: int = 128  # final held-out evaluation (1024-byte windows)
    eval_bytes: int = 1024
    masked_acc_windows: int = 48
    file_windows: int = 32  # per held-out file, for the file-by-file table
    train_eval_windows: int = 64  # random training windows evaluated next to held-out
    n_samples: int = 10
    sample_bytes: int = 96
    checkpoint_dtype: str = "float32"  # how the final BLT-D is stored (the report evaluates what is stored)
    extra: dict[str, Any] = field(default_factory=dict)


# At 1:1 the noisy 1/t-weighted mask loss kept the BLT-D's gradient norm above the clip threshold
# for a whole 90-minute run and slowed the next-byte loss (REPORT.md of that run); FBLT's small
# runs cap the weight near 0.3 (shared reference notes, section 9.6).
DEFAULT_MASK_WEIGHT = 0.3


# Peak learning rates from 20-minute side-by-side trials (benchmarks/results/train_variants.md): the
# BLT-D kept gaining up to 8e-3 (held-out 2.54 at 3e-3, 2.26 at 5e-3, 2.22 at 8e-3), the byte LM
# was best at 3e-3 (2.16; 2.27 at 5e-3). The BLT-D's is set a little below its 20-minute best,
# since a 7x longer run usually wants a lower peak.
DEFAULT_LR = 6e-3
DEFAULT_BASELINE_LR = 3e-3
# The BLT-D's recipe from later side-by-side trials (same file): the fan-in scaled init
# (held-out 2.13 -> 1.97 at 20 minutes; with PyTorch's defaults the global transformer starts
# swamped by its input) and the global transformer at a quarter of the peak lr (the decoder then
# reads its latent a little more: zero-latent cost +0.059 vs +0.036 bits/byte, held-out 2.200 vs
# 2.214). The byte LM keeps PyTorch's init, its better one in those trials (1.96 vs 2.00).
DEFAULT_BLT_INIT = "scaled"
DEFAULT_GLOBAL_LR_MULT = 0.25


def default_plan(minutes: float, entropy_minutes: float, baseline_minutes: float | None) -> TrainPlan:
    """The embedded default's recipe; the baseline's budget defaults to the BLT-D's whole training
    time (entropy phase included), so that the comparison is at equal wall clock."""
    if baseline_minutes is None:
        baseline_minutes = entropy_minutes + minutes
    return TrainPlan(
        model=default_config(),
        baseline=StackConfig(dim=256, n_layers=4, n_heads=4, ffn_dim=768, window=512, max_positions=8192),
        entropy=PhaseConfig(lr=3e-3, batch=8, seq_bytes=1024, minutes=entropy_minutes, warmup_steps=50),
        blt=PhaseConfig(
            lr=DEFAULT_LR,
            batch=4,
            seq_bytes=1024,
            minutes=minutes,
            warmup_steps=100,
            max_blocks=16,
            mask_weight=DEFAULT_MASK_WEIGHT,
            global_lr_mult=DEFAULT_GLOBAL_LR_MULT,
            init=DEFAULT_BLT_INIT,
        ),
        base=PhaseConfig(lr=DEFAULT_BASELINE_LR, batch=4, seq_bytes=1024, minutes=baseline_minutes),
        # 30.6 MB instead of 11.2: library code alone is seen ~3 times in 135 minutes and the BLT-D
        # memorises it (its held-out number stalls after ~90 minutes; benchmarks/results/learning_curves_*)
        corpus_tests=True,
        checkpoint_dtype="float16",
    )


def with_precision(plan: TrainPlan, bf16: bool) -> TrainPlan:
    """The plan with every phase's forward passes in bf16 autocast (True) or fp32."""
    phases = {k: replace(getattr(plan, k), bf16=bf16) for k in ("entropy", "blt", "base")}
    return replace(plan, **phases)


# x86 CPU flags of hardware bf16 matrix products (Linux /proc/cpuinfo names)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # macOS, Windows
        return ""


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), read from /proc/cpuinfo.

    Only there does bf16 autocast pay (BLT-D steps ~1.2x, byte-LM steps ~1.6x faster than fp32).
    Elsewhere it is emulated and 7-14x slower: 21.7 s against 1.9 s per BLT-D step on an AVX2-only
    EPYC (benchmarks/results/train_speed.md). No /proc/cpuinfo or no such flag -> False.
    """
    flags: set[str] = set()
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def cpu_description(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU a phase trained on (its bytes/s depend on it): model name, torch's SIMD level, native bf16."""
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    names = [v.strip() for k, _, v in (ln.partition(":") for ln in cpuinfo.splitlines()) if k.strip() == "model name"]
    return {
        "model": names[0] if names else (platform.processor() or platform.machine()),
        "cores": os.cpu_count(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(cpuinfo),
    }


PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(plan: TrainPlan, precision: str) -> TrainPlan:
    """`--precision`: bf16 or fp32 as asked; auto = bf16 autocast only on a CPU with native bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    bf16 = cpu_has_native_bf16() if precision == "auto" else precision == "bf16"
    return with_precision(plan, bf16)


def smoke_plan() -> TrainPlan:
    """Seconds on one core: tiny models on the first ~300 kB of the corpus, fixed step counts."""
    local = dict(n_heads=2, window=128, max_positions=2048)
    model = BltConfig(
        encoder=StackConfig(dim=32, n_layers=1, ffn_dim=64, **local),
        global_model=StackConfig(dim=64, n_layers=1, n_heads=2, ffn_dim=128, max_positions=2048),
        decoder=StackConfig(dim=32, n_layers=1, ffn_dim=64, **local),
        entropy=StackConfig(dim=32, n_layers=1, ffn_dim=64, rope_theta=10000.0, **local),
        cross_attn_k=2,
        hash_sizes=(3, 4),
        hash_vocab=256,
        blt_d=BltDConfig(block_size=8),
    )
    fast = dict(warmup_steps=5, eval_every_s=1e9, ckpt_every_s=1e9, eval_windows=2)
    return TrainPlan(
        model=model,
        baseline=StackConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, window=128, max_positions=2048),
        entropy=PhaseConfig(lr=1e-2, batch=4, seq_bytes=128, max_steps=25, **fast),
        blt=PhaseConfig(
            lr=1e-2,
            batch=4,
            seq_bytes=128,
            max_steps=30,
            max_blocks=16,
            global_lr_mult=DEFAULT_GLOBAL_LR_MULT,  # the default's recipe, so the smoke test covers it
            init=DEFAULT_BLT_INIT,
            **fast,
        ),
        base=PhaseConfig(lr=1e-2, batch=4, seq_bytes=128, max_steps=10, **fast),
        corpus_limit_bytes=300_000,
        eval_windows=4,
        eval_bytes=256,
        masked_acc_windows=2,
        file_windows=1,
        train_eval_windows=2,
        n_samples=2,
        sample_bytes=16,
        checkpoint_dtype="float16",  # as the default's, so the smoke test covers storing in half precision
    )


# ------------------------------------------------------------------------------- the loop
def lr_at(pc: PhaseConfig, step: int, progress: float) -> float:
    """Linear warm-up over warmup_steps, then cosine from lr to min_lr_frac * lr as progress -> 1."""
    if step < pc.warmup_steps:
        return pc.lr * (step + 1) / pc.warmup_steps
    p = min(1.0, max(0.0, progress))
    return pc.lr * (pc.min_lr_frac + (1 - pc.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def make_optimizer(model: nn.Module, pc: PhaseConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; each group carries its lr multiplier (`lr_mult`)."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            mult = pc.global_lr_mult if name.startswith("global_transformer.") else 1.0
            groups.setdefault((p.dim() >= 2, mult), []).append(p)
    return torch.optim.AdamW(
        [
            {"params": ps, "weight_decay": pc.weight_decay if decay else 0.0, "lr_mult": mult}
            for (decay, mult), ps in groups.items()
        ],
        lr=pc.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


StepFn = Callable[[Tensor, torch.Generator], tuple[Tensor, dict[str, float]]]


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, pc: PhaseConfig, step_fn: StepFn, x: Tensor, gen: torch.Generator
) -> tuple[Tensor, dict[str, float], float]:
    """One optimizer step on batch x (forward under the phase's precision); returns loss, metrics, grad norm."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=pc.bf16):
        loss, metrics = step_fn(x, gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    opt.step()
    return loss, metrics, gnorm


def run_phase(
    name: str,
    model: nn.Module,
    pc: PhaseConfig,
    step_fn: StepFn,
    corpus: Corpus,
    eval_fn: Callable[[], dict[str, float]],
    state_dir: Path,
    seed: int,
    resume: bool,
    reporter: Reporter = SILENT,
) -> dict[str, Any]:
    """Train `model` for one phase; returns the history (lists) and counters.

    Saves OUT/<phase>/train_state.pt every ckpt_every_s and at the end; with `resume`, a saved
    state continues (same step, elapsed time, RNG and optimizer state). Each sitting that trains is
    recorded in st["sittings"] (its CPU, precision, threads, first step): bytes/s depend on them.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    state_path = state_dir / "train_state.pt"
    opt = make_optimizer(model, pc)
    gen = torch.Generator().manual_seed(seed)
    st: dict[str, Any] = {"step": 0, "elapsed": 0.0, "bytes": 0, "done": 0, "hist": {}, "evals": {}}
    if resume and state_path.exists():
        saved = torch.load(state_path, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optim"])
        gen.set_state(saved["gen"])
        torch.set_rng_state(saved["torch_rng"])
        st = saved["st"]
    if st["done"] and (pc.minutes is None or st["elapsed"] >= 60.0 * pc.minutes - 1.0):
        return st  # finished; a larger --minutes on --resume extends the phase
    st["done"] = 0
    sitting = {"from_step": st["step"], "from_s": st["elapsed"], "bf16": pc.bf16, "threads": torch.get_num_threads()}
    st.setdefault("sittings", []).append(sitting | {"cpu": cpu_description()})

    def save() -> None:
        state = {"model": model.state_dict(), "optim": opt.state_dict(), "gen": gen.get_state()}
        state.update({"torch_rng": torch.get_rng_state(), "st": st})
        torch.save(state, state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)

    budget_s = None if pc.minutes is None else 60.0 * pc.minutes
    total = pc.max_steps if pc.max_steps is not None else int(budget_s)
    initial = st["step"] if pc.max_steps else int(st["elapsed"])
    bar = reporter.bar(total=total, initial=initial, desc=name, unit="step", mininterval=0.5 if pc.max_steps else 20.0)
    if budget_s is not None:
        bar.unit = "s"
    start = time.time() - st["elapsed"]
    last_eval, last_ckpt = st["elapsed"], st["elapsed"]
    model.train()
    while True:
        elapsed = time.time() - start
        progress = st["step"] / pc.max_steps if pc.max_steps is not None else elapsed / budget_s
        if progress >= 1.0:
            break
        lr = lr_at(pc, st["step"], progress)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        x = corpus.sample(pc.batch, pc.seq_bytes, gen)
        loss, metrics, gnorm = train_step(model, opt, pc, step_fn, x, gen)
        st["step"] += 1
        st["bytes"] += pc.batch * pc.seq_bytes
        now = time.time() - start
        st["elapsed"] = now
        row = {"step": st["step"], "elapsed": now, "lr": lr, "loss": loss.item(), "grad_norm": gnorm, **metrics}
        for k, v in row.items():
            st["hist"].setdefault(k, []).append(float(v))
        bar.set_postfix(loss=f"{row['loss']:.3f}", bps=f"{st['bytes'] / max(now, 1e-9):.0f}")
        bar.update(1 if pc.max_steps is not None else int(now) - bar.n)
        if now - last_eval >= pc.eval_every_s:
            model.eval()
            ev = eval_fn()
            model.train()
            for k, v in {"step": st["step"], "elapsed": now, **ev}.items():
                st["evals"].setdefault(k, []).append(float(v))
            bar.write(f"[{name}] step {st['step']} {now / 60:.1f} min held-out " + json.dumps(ev))
            last_eval = time.time() - start
        if now - last_ckpt >= pc.ckpt_every_s:
            save()
            last_ckpt = now
    bar.close()
    model.eval()
    st["done"] = 1
    save()
    return st


# ------------------------------------------------------------------------------- phases
def choose_threshold(ent_model: EntropyModel, corpus: Corpus, seq_bytes: int, seed: int, n: int = 64) -> float:
    """The entropy quantile that gives a mean patch length of ~TARGET_PATCH_LEN on training windows.

    Patches per window = 2 + #{1 <= i <= N-2 : H_i > theta} for N tokens, so we need a fraction
    (N / L - 2) / (N - 2) of entropies above theta; a few bisection steps then fix rounding.
    """
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        x = corpus.sample(n, seq_bytes, gen)
        from fastblt.model.patching import entropy

        ent = torch.cat([entropy(ent_model(x[i : i + 8])) for i in range(0, n, 8)])
    N = x.shape[1]
    frac = (N / TARGET_PATCH_LEN - 2) / (N - 2)
    inner = ent[:, 1 : N - 1].flatten()
    lo, hi = float(inner.min()), float(inner.max())
    theta = float(torch.quantile(inner[:100_000], 1 - frac))

    def mean_len(th: float) -> float:
        return x.numel() / float(patch_starts_from_entropies(ent, th).sum())

    for _ in range(30):  # bisection on the monotone mean length
        m = mean_len(theta)
        if abs(m - TARGET_PATCH_LEN) < 0.01:
            break
        if m > TARGET_PATCH_LEN:
            hi = theta
        else:
            lo = theta
        theta = 0.5 * (lo + hi)
    return theta


def run_byte_lm(
    name: str,
    model: EntropyModel,
    pc: PhaseConfig,
    plan: TrainPlan,
    corpus: Corpus,
    out: Path,
    seed: int,
    resume: bool,
    reporter: Reporter = SILENT,
) -> dict[str, Any]:
    """A plain next-byte LM phase (the entropy model, the baseline), evaluated on held-out windows."""
    windows = corpus.heldout_windows(plan.eval_bytes, pc.eval_windows)
    step = byte_lm_step(model)
    return run_phase(name, model, pc, step, corpus, lambda: eval_bpb(model, windows), out, seed, resume, reporter)


def byte_lm_step(model: EntropyModel) -> StepFn:
    """A byte LM's training loss: next-byte CE."""
    return lambda x, g: (lm_loss(model(x), x), {})


def blt_d_step(model: BltModel, pc: PhaseConfig) -> StepFn:
    """The BLT-D's training loss: patch with the frozen entropy model, then L_clean + w * L_mask."""

    def step(x: Tensor, g: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        model.entropy_model.eval()
        lengths = patch_batch(model, x, fused=True)
        return blt_d_loss(model, x, lengths, g, pc.max_blocks, mask_weight=pc.mask_weight, hash_dropout=pc.hash_dropout)

    return step


def byte_lm_result(model: EntropyModel, st: dict[str, Any], plan: TrainPlan, corpus: Corpus) -> dict[str, Any]:
    """What a byte-LM phase reports: size, steps, time, bytes, held-out bits/byte, loss history."""
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "steps": st["step"],
        "wall_s": st["elapsed"],
        "train_bytes": st["bytes"],
        "sittings": st.get("sittings", []),
        "heldout": eval_bpb(model, corpus.heldout_windows(plan.eval_bytes, plan.eval_windows)),
        "hist": st["hist"],
    }


def initialised(model: nn.Module, pc: PhaseConfig) -> nn.Module:
    """A freshly built model with the phase's initialisation."""
    assert pc.init in ("torch", "scaled"), f"unknown init {pc.init!r}"
    return init_weights(model) if pc.init == "scaled" else model


def train_entropy(
    plan: TrainPlan, corpus: Corpus, out: Path, seed: int, resume: bool, reporter: Reporter = SILENT
) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = initialised(EntropyModel(plan.model.entropy, VOCAB_SIZE), plan.entropy)
    st = run_byte_lm("entropy", model, plan.entropy, plan, corpus, out / "entropy", seed, resume, reporter)
    result_path = out / "entropy" / "result.json"
    if resume and result_path.exists():
        return json.loads(result_path.read_text())
    theta = choose_threshold(model, corpus, plan.blt.seq_bytes, seed)
    save_file(model.state_dict(), str(out / "entropy" / "model.safetensors"))
    result = {"threshold": theta, **byte_lm_result(model, st, plan, corpus)}
    result_path.write_text(json.dumps(result))
    return result


def build_blt(plan: TrainPlan, out: Path, threshold: float) -> BltModel:
    """The BLT-D with the trained entropy model frozen inside it."""
    cfg = plan.model.replace(patching=PatchingConfig(threshold=threshold))
    model = initialised(BltModel(cfg), plan.blt)
    model.entropy_model.load_state_dict(load_file(str(out / "entropy" / "model.safetensors")))
    for p in model.entropy_model.parameters():
        p.requires_grad_(False)
    return model


def blt_forward(model: BltModel) -> Callable[[Tensor], Tensor]:
    return lambda x: model(x, patch_batch(model, x))


def train_blt(
    plan: TrainPlan, corpus: Corpus, out: Path, seed: int, resume: bool, reporter: Reporter = SILENT
) -> dict[str, Any]:
    ent = json.loads((out / "entropy" / "result.json").read_text())
    torch.manual_seed(seed + 1)
    model = build_blt(plan, out, ent["threshold"])
    windows = corpus.heldout_windows(plan.eval_bytes, plan.blt.eval_windows)
    pc, evaluate = plan.blt, lambda: eval_bpb(blt_forward(model), windows)
    st = run_phase("blt-d", model, pc, blt_d_step(model, pc), corpus, evaluate, out / "blt", seed, resume, reporter)
    save_model(model, out / "checkpoint", getattr(torch, plan.checkpoint_dtype))
    result = {"steps": st["step"], "wall_s": st["elapsed"], "train_bytes": st["bytes"], "hist": st["hist"]}
    result["checkpoint_dtype"] = plan.checkpoint_dtype
    result["sittings"] = st.get("sittings", [])
    result["evals"], result["phase"] = st["evals"], asdict(pc)
    (out / "blt" / "result.json").write_text(json.dumps(result))
    return result


def train_baseline(
    plan: TrainPlan, corpus: Corpus, out: Path, seed: int, resume: bool, reporter: Reporter = SILENT
) -> dict[str, Any]:
    torch.manual_seed(seed + 2)
    model = initialised(EntropyModel(plan.baseline, VOCAB_SIZE), plan.base)
    st = run_byte_lm("baseline", model, plan.base, plan, corpus, out / "baseline", seed + 2, resume, reporter)
    save_file(model.state_dict(), str(out / "baseline" / "model.safetensors"))
    result = {"config": asdict(plan.baseline), **byte_lm_result(model, st, plan, corpus), "evals": st["evals"]}
    result["phase"] = asdict(plan.base)  # as trained (a later report may run with other options)
    (out / "baseline" / "result.json").write_text(json.dumps(result))
    return result


def save_model(model: BltModel, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Our fastblt checkpoint format (config.json + model.safetensors), weights stored as `dtype`."""
    return save_checkpoint(model, out_dir, fmt="fastblt", dtype=dtype, overwrite=True)
