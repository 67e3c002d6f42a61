"""The training report of `fastblt train`: REPORT.md + report.json + loss_curve.png in OUT/.

Everything is measured here, from the saved checkpoint and the phases' result.json files:
held-out bits per byte of the AR path on 1024-byte windows (also by position in the patch and
file by file, next to the baseline's), mean patch length, masked-byte accuracy in the inference
layout next to AR accuracy, greedy samples, and the baseline.
"""

from __future__ import annotations

import json
import platform
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastblt.errors import InputError
from fastblt.formats.checkpoint import checkpoint_hash
from fastblt.model.blt import BltModel, EntropyModel
from fastblt.model.config import VOCAB_SIZE, StackConfig
from fastblt.model.patching import entropy
from fastblt.train.blt_d import (
    LN2,
    eval_bpb,
    lengths_from_starts,
    masked_accuracy_inference_layout,
    mean_patch_length,
    patch_starts_from_entropies,
)
from fastblt.train.corpus import (
    PREVIOUS_HELDOUT_LIST,
    Corpus,
    heldout_list_digest,
    in_test_dir,
    read_heldout_list,
)
from fastblt.train.progress import SILENT, Reporter

MASK_RATES = (0.1, 0.25, 0.5, 0.75, 1.0)


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def function_header_prompts(corpus: Corpus, n: int, context: int = 300) -> list[bytes]:
    """Deterministic prompts: `context` bytes of a held-out file ending with a `def ...:` line.

    Headers are spread over the held-out files (every k-th match), one line each.
    """
    found = []
    for text in corpus.heldout_texts:
        for m in re.finditer(rb"^[ \t]*def [^\n]*:[ \t]*\n", text, flags=re.M):
            found.append(text[max(0, m.end() - context) : m.end()])
    if not found:
        return []
    step = max(1, len(found) // n)
    return found[::step][:n]


def load_final_model(out: Path) -> BltModel:
    from fastblt.formats.checkpoint import load_checkpoint

    return load_checkpoint(out / "checkpoint")


def load_baseline(out: Path, base: dict[str, Any]) -> EntropyModel:
    from safetensors.torch import load_file

    model = EntropyModel(StackConfig(**base["config"]), VOCAB_SIZE)
    model.load_state_dict(load_file(str(out / "baseline" / "model.safetensors")))
    return model.eval()


@torch.no_grad()
def bits_by_patch_position(
    model: BltModel, baseline: EntropyModel | None, windows: Tensor, buckets: int = 8, batch: int = 8
) -> list[dict[str, float]]:
    """Where the BLT-D's bits go: mean bits of the held-out bytes by their position in their patch
    (0 = a patch's first byte, the first to read the newest latent; the last bucket is `buckets-1`
    and later), next to the plain byte LM's bits on the same bytes."""
    th = model.config.patching.threshold
    sums, counts = torch.zeros(2, buckets, dtype=torch.float64), torch.zeros(buckets, dtype=torch.float64)
    for x in windows.split(batch):
        starts = patch_starts_from_entropies(entropy(model.entropy_model(x)), th)
        idx = torch.arange(x.shape[1]).expand_as(x)
        pos = (idx - torch.where(starts, idx, 0).cummax(dim=1).values)[:, 1:].clamp(max=buckets - 1)
        logits = [model(x, lengths_from_starts(starts))] + ([baseline(x)] if baseline is not None else [])
        for row, out in enumerate(logits):
            nll = F.cross_entropy(out[:, :-1].transpose(1, 2), x[:, 1:], reduction="none") / LN2
            sums[row] += torch.zeros(buckets, dtype=torch.float64).index_add_(0, pos.flatten(), nll.flatten().double())
        counts += torch.bincount(pos.flatten(), minlength=buckets).double()
    total = float(counts.sum())
    return [
        {
            "position": i,
            "share": float(counts[i]) / total,
            "blt_d_bits": float(sums[0, i] / counts[i]) if counts[i] else float("nan"),
            "baseline_bits": float(sums[1, i] / counts[i]) if counts[i] and baseline is not None else None,
        }
        for i in range(buckets)
    ]


@torch.no_grad()
def bits_by_file(
    models: dict[str, Callable[[Tensor], Tensor]],
    corpus: Corpus,
    n_bytes: int,
    headline: int,
    per_file: int = 32,
    train: int = 64,
    reporter: Reporter = SILENT,
) -> dict[str, Any]:
    """Held-out bits per byte file by file (up to `per_file` evenly spaced windows each), for every
    model, plus the same on `train` random training windows (fixed seed).

    The headline windows are spread evenly over all held-out bytes, so one large file can dominate
    them (`share` = its fraction of the headline windows); this table shows what each file costs and
    how far held-out is from the training distribution.
    """
    picked = corpus.heldout_window_index(n_bytes, headline)
    share = Counter(f for f, _ in picked)
    rows = []
    for i, name in enumerate(corpus.heldout_files):
        windows = corpus.file_windows(i, n_bytes, per_file)
        if windows is None:
            continue
        reporter.say(f"bits by file: {name}")
        bpb = {m: eval_bpb(fwd, windows)["bpb"] for m, fwd in models.items()}
        rows.append(
            {
                "file": name,
                "bytes": len(corpus.heldout_texts[i]),
                "windows": len(windows),
                "share": share[i] / len(picked),
                "bpb": bpb,
            }
        )
    largest = max(rows, key=lambda r: r["bytes"])
    rest = [r for r in rows if r is not largest]
    tests = [r for r in rows if in_test_dir(r["file"])]
    windows = corpus.sample(train, n_bytes, torch.Generator().manual_seed(0))
    reporter.say("bits on training windows")
    return {
        "files": rows,
        "per_file": per_file,
        "largest": largest["file"],
        "without_largest": _pooled(rest, models),
        "test_files": _pooled(tests, models),
        "n_test_files": len(tests),
        "train_windows": {m: eval_bpb(fwd, windows)["bpb"] for m, fwd in models.items()},
        "n_train_windows": train,
    }


def _pooled(rows: list[dict[str, Any]], models: dict[str, Any]) -> dict[str, float] | None:
    """Bits per byte over the windows of `rows` (files) together, per model."""
    if not rows:
        return None
    return {m: sum(r["bpb"][m] * r["windows"] for r in rows) / sum(r["windows"] for r in rows) for m in models}


@torch.no_grad()
def latent_use(model: BltModel, windows: Tensor, batch: int = 8) -> dict[str, float]:
    """How much the decoder's next-byte predictions depend on the global model's latent.

    Held-out bits per byte with each byte reading its own latent (the model as trained: equal to
    the headline), the previous patch's latent (one patch stale, what a BLT-S draft reads) and an
    all-zero latent, plus how often the greedy byte agrees between fresh and stale. A decoder that
    ignores the global model scores the same in all three and agrees ~100%: its BLT-S acceptance
    is then high for a reason that has nothing to do with drafting.
    """
    from fastblt.model.patching import decoder_patch_ids
    from fastblt.train.blt_d import patch_batch

    nll = {"fresh": 0.0, "stale": 0.0, "zero": 0.0}
    agree, count = 0, 0
    for x in windows.split(batch):
        pl = patch_batch(model, x)
        h = model.encode(x)
        latents = model.global_latents(h, pl)
        read = decoder_patch_ids(pl, x.shape[1])
        runs = {
            "fresh": model.decode(h, latents, read),
            "stale": model.decode(h, latents, (read - 1).clamp(min=0)),
            "zero": model.decode(h, torch.zeros_like(latents), read),
        }
        tgt = x[:, 1:]
        for k, logits in runs.items():
            nll[k] += float(F.cross_entropy(logits[:, :-1].transpose(1, 2), tgt, reduction="sum"))
        agree += int((runs["fresh"].argmax(-1) == runs["stale"].argmax(-1))[:, :-1].sum())
        count += tgt.numel()
    return {f"bpb_{k}_latent": v / count / LN2 for k, v in nll.items()} | {"greedy_agree_fresh_stale": agree / count}


def _rms(t: Tensor) -> float:
    return float(t.float().pow(2).mean(-1).sqrt().mean())


@torch.no_grad()
def decoder_scales(model: BltModel, windows: Tensor) -> list[dict[str, float]]:
    """Why a decoder can ignore the latent: per decoder layer, the RMS of the residual stream entering
    its cross-attention and of what the cross-attention (the latent's only way in), the
    self-attention and the FFN add to it. The released doubled residual (2x + attn) doubles the
    stream at every cross-attention layer, so the latent moves predictions only when the
    cross-attention's output keeps up with the stream. Read off with forward hooks on the model as
    it runs (the clean AR path over `windows`).
    """
    dec = model.local_decoder
    sums: dict[tuple[int, str], list[float]] = {}

    def record(i: int, what: str, use_input: bool):
        def hook(_m, inp, out):
            sums.setdefault((i, what), []).append(_rms(inp[0] if use_input else out))

        return hook

    handles = []
    for i, xattn in enumerate(dec.cross_attn_layers):
        handles.append(xattn.cross_attn_norm_q.register_forward_hook(record(i, "stream_in", True)))
        handles.append(xattn.wo.register_forward_hook(record(i, "cross_attn_adds", False)))
    for i, layer in enumerate(dec.layers):
        handles.append(layer.attention.wo.register_forward_hook(record(i, "self_attn_adds", False)))
        handles.append(layer.feed_forward.register_forward_hook(record(i, "ffn_adds", False)))
    try:
        from fastblt.train.loop import blt_forward

        forward = blt_forward(model)
        for x in windows.split(8):
            forward(x)
    finally:
        for h in handles:
            h.remove()
    rows: dict[int, dict[str, float]] = {}
    for (i, what), vals in sums.items():
        rows.setdefault(i, {"layer": i})[what] = sum(vals) / len(vals)
    return [rows[i] for i in sorted(rows)]


SAMPLE_MODES = ("ar", "blt-s", "blt-dv", "blt-d")  # in the order the report shows them
# (model, prompts, max_bytes) -> one row per prompt: greedy output per mode (fastblt.bench.samples)
Sampler = Callable[[BltModel, list[bytes], int], list[dict]]


def python_shape(def_line: str, text: str) -> dict[str, bool | None]:
    """Checkable signs that a continuation of `def_line` looks like Python.

    body_indented: its first non-empty line is indented deeper than the `def`; indent_by_4: every
    complete non-empty line is indented by a multiple of 4 spaces (no tabs); brackets_balanced:
    ()[]{} balance over its complete lines, outside quotes (None without a complete line).
    """
    complete = text[: text.rfind("\n") + 1].splitlines() if "\n" in text else []
    first = next((line for line in text.splitlines() if line.strip()), None)

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip(" "))

    return {
        "body_indented": first is not None and indent(first) > indent(def_line),
        "indent_by_4": all(indent(x) % 4 == 0 and not x.startswith("\t") for x in complete if x.strip()),
        "brackets_balanced": _balanced(complete) if complete else None,
    }


def _balanced(lines: list[str]) -> bool:
    """Brackets balance across `lines`, skipping one-line quotes and comments (escapes not handled)."""
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for line in lines:
        quote = None
        for ch in line:
            if quote:
                quote = None if ch == quote else quote
            elif ch == "#":
                break
            elif ch in "'\"":
                quote = ch
            elif ch in "([{":
                stack.append(ch)
            elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
                return False
    return not stack


def shape_summary(samples: list[dict], mode: str) -> str:
    shapes = [python_shape(s["prompt_tail"], s[mode]["text"]) for s in samples if mode in s]
    n = len(shapes)
    judged = [x["brackets_balanced"] for x in shapes if x["brackets_balanced"] is not None]
    return (
        f"`{mode}`: body indented under the `def` in {sum(x['body_indented'] for x in shapes)}/{n}, indentation in "
        f"multiples of 4 in {sum(x['indent_by_4'] for x in shapes)}/{n}, brackets balanced over complete lines in "
        f"{sum(judged)}/{len(judged)} (samples with a complete line)"
    )


def sample_lines(samples: list[dict]) -> list[str]:
    lines = []
    for i, s in enumerate(samples):
        lines += [f"### Sample {i + 1} (ar == blt-s == blt-dv: {s['lossless_agree']})", ""]
        for m in SAMPLE_MODES:
            if m in s:
                rate = s[m]["acceptance_rate"]
                lines += [f"`{m}`" + ("" if rate is None else f", acceptance {rate:.2f}") + ":", "```python"]
                lines += [s["prompt_tail"], s[m]["text"], "```", ""]
    return lines


@torch.no_grad()
def evaluate_final(
    out: Path, plan: Any, corpus: Corpus, samples: Sampler | None = None, reporter: Reporter = SILENT
) -> dict[str, Any]:
    """Held-out evaluation of the saved BLT-D (AR path), its patching, and masked accuracy; with
    `samples`, greedy samples per mode through the runtime (which lives above training)."""
    from fastblt.train.loop import blt_forward

    model = load_final_model(out)
    windows = corpus.heldout_windows(plan.eval_bytes, plan.eval_windows)
    base = _read(out / "baseline" / "result.json")
    baseline = load_baseline(out, base) if base else None
    reporter.say(f"held-out bits per byte on {len(windows)} windows")
    result: dict[str, Any] = {"heldout_ar": eval_bpb(blt_forward(model), windows)}
    reporter.say("bits by position in the patch")
    result["bits_by_patch_position"] = bits_by_patch_position(model, baseline, windows)
    result["mean_patch_len_heldout"] = mean_patch_length(model, windows)
    reporter.say("use of the global latent")
    result["latent_use"] = latent_use(model, windows)
    result["decoder_scales"] = decoder_scales(model, windows[:16])
    models = {"blt_d": blt_forward(model)} | ({"baseline": baseline} if baseline is not None else {})
    result["bits_by_file"] = bits_by_file(
        models, corpus, plan.eval_bytes, plan.eval_windows, plan.file_windows, plan.train_eval_windows
    )
    previous = set(read_heldout_list(PREVIOUS_HELDOUT_LIST)) & set(corpus.heldout_files)
    if previous:  # the earlier defaults' headline, on their files
        reporter.say(f"held-out bits per byte on the {len(previous)} files of the first held-out list")
        w = corpus.heldout_windows(plan.eval_bytes, plan.eval_windows, only=previous)
        result["heldout_previous_list"] = {"files": len(previous)} | {
            m: eval_bpb(f, w)["bpb"] for m, f in models.items()
        }
    reporter.say("masked-byte accuracy in the inference layout")
    acc_windows = corpus.heldout_windows(plan.eval_bytes, plan.masked_acc_windows)
    result["masked_acc_inference_layout"] = masked_accuracy_inference_layout(model, acc_windows, MASK_RATES)
    if samples is not None:
        reporter.say(f"{plan.n_samples} greedy samples per mode")
        result["samples"] = samples(model, function_header_prompts(corpus, plan.n_samples), plan.sample_bytes)
    return result | {"params": model.num_params(), "config": model.config.to_dict()}


def write_report(
    out: Path,
    plan: Any,
    corpus: Corpus,
    seed: int,
    extra: dict[str, Any] | None = None,
    samples: Sampler | None = None,
    reporter: Reporter = SILENT,
) -> dict:
    """Evaluate and write OUT/report.json, OUT/REPORT.md and OUT/loss_curve.png; returns the JSON."""
    ent, blt, base = (_read(out / p / "result.json") for p in ("entropy", "blt", "baseline"))
    final = evaluate_final(out, plan, corpus, samples, reporter)
    report = {
        "python": sys.version.split()[0],
        "python_full": sys.version,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "seed": seed,
        # ties this report to the weights it measured: `checkpoint_hash("default")` must equal it once shipped
        "checkpoint_hash": checkpoint_hash(out / "checkpoint") if (out / "checkpoint").is_dir() else None,
        "corpus": {
            "stdlib_dir": str(corpus.root),
            "test_dirs": plan.corpus_tests,
            "heldout_from_tests": any(in_test_dir(f) for f in corpus.heldout_files),
            "heldout_list_sha256": heldout_list_digest(),
            "train_files": len(corpus.train_files),
            "train_bytes": corpus.n_train_bytes,
            "heldout_files": len(corpus.heldout_files),
            "heldout_bytes": corpus.n_heldout_bytes,
            "heldout_missing": len(corpus.missing_heldout),
            "heldout_fraction": corpus.n_heldout_bytes / (corpus.n_heldout_bytes + corpus.n_train_bytes),
            "eval_windows": plan.eval_windows,
            "eval_window_bytes": plan.eval_bytes,
        },
        "entropy": {k: v for k, v in (ent or {}).items() if k != "hist"},
        "blt_d": {
            "steps": blt["steps"] if blt else None,
            "wall_s": blt["wall_s"] if blt else None,
            "train_bytes": blt["train_bytes"] if blt else None,
            "bytes_per_s": blt["train_bytes"] / blt["wall_s"] if blt else None,
            "phase": blt.get("phase", vars(plan.blt)) if blt else vars(plan.blt),  # as trained
            "checkpoint_dtype": blt.get("checkpoint_dtype", "float32") if blt else None,
            "sittings": blt.get("sittings", []) if blt else [],
            **final,
        },
        "baseline": (
            {k: v for k, v in base.items() if k not in ("hist", "evals")}
            | {"bytes_per_s": base["train_bytes"] / base["wall_s"], "phase": base.get("phase", vars(plan.base))}
            if base
            else None
        ),
        **(extra or {}),
    }
    _attach_notes(out, report)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot_losses(out / "loss_curve.png", ent, blt, base)
    (out / "REPORT.md").write_text(render_markdown(report))
    return report


def _attach_notes(out: Path, report: dict[str, Any]) -> None:
    """OUT/notes.md, if present, becomes the report's notes (absent: the report has none)."""
    report.pop("notes", None)
    if (out / "notes.md").exists():
        report["notes"] = (out / "notes.md").read_text().strip()


def rewrite_notes(out: Path) -> dict[str, Any]:
    """Re-render OUT/report.json and REPORT.md with the current OUT/notes.md, measuring nothing.

    The notes are usually written once the numbers are known, and the report phase that measures
    them takes half an hour on the default; this changes the notes and nothing else.
    """
    path = out / "report.json"
    if not path.exists():
        raise InputError(f"{path}: no report to add notes to; run `fastblt train --phase report` first")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err}); rerun `fastblt train --phase report`") from None
    _attach_notes(out, report)
    path.write_text(json.dumps(report, indent=2))
    (out / "REPORT.md").write_text(render_markdown(report))
    return report


def _smooth(hist: dict[str, list[float]], key: str, points: int = 200) -> tuple[Tensor, Tensor]:
    """(minutes, moving average of hist[key]) with about `points` points."""
    y = torch.tensor(hist[key])
    k = max(1, len(y) // points)
    n = (len(y) // k) * k
    y = y[:n].view(-1, k).mean(-1)
    x = torch.tensor(hist["elapsed"])[:n].view(-1, k)[:, -1] / 60
    return x, y


def plot_losses(path: Path, ent: dict | None, blt: dict | None, base: dict | None) -> None:
    """Left: train and held-out bits/byte per phase vs the phase's minutes; right: BLT-D's two losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ln2 = 0.6931471805599453
    for name, res, key in (("entropy LM", ent, "loss"), ("BLT-D clean", blt, "loss_clean"), ("baseline", base, "loss")):
        if not res or key not in res.get("hist", {}):
            continue
        x, y = _smooth(res["hist"], key)
        line = ax[0].plot(x, y / ln2, label=f"{name} (train)")[0]
        ev = res.get("evals", {})
        if ev.get("bpb"):
            ax[0].plot(
                torch.tensor(ev["elapsed"]) / 60, ev["bpb"], "o--", color=line.get_color(), label=f"{name} held-out"
            )
    ax[0].set_xlabel("minutes of the phase")
    ax[0].set_ylabel("bits / byte")
    ax[0].set_ylim(0.5, 6)
    ax[0].legend(fontsize=8)
    if blt and "loss_mask" in blt.get("hist", {}):
        for key in ("loss_clean", "loss_mask"):
            ax[1].plot(*_smooth(blt["hist"], key), label=f"BLT-D {key}")
        ax[1].set_xlabel("minutes")
        ax[1].set_ylabel("nats per position")
        ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def render_markdown(r: dict[str, Any]) -> str:
    c, b, base, e = r["corpus"], r["blt_d"], r["baseline"], r["entropy"]
    p = b["params"]
    lines = [
        "# The embedded default: training report",
        "",
        f"Trained by `fastblt train` on CPython {r['python']}'s standard library (`{c['stdlib_dir']}`), "
        f"torch {r['torch']}, seed {r['seed']}, {r['platform']}.",
        "",
        f"Checkpoint hash (`fastblt.formats.checkpoint.checkpoint_hash`, config + weights): "
        f"`{r.get('checkpoint_hash')}`.",
        "",
        "## Corpus",
        f"- training: {c['train_files']} files, {c['train_bytes']:,} bytes; held-out: {c['heldout_files']} files, "
        f"{c['heldout_bytes']:,} bytes ({100 * c['heldout_fraction']:.1f}%), {c['heldout_missing']} listed files "
        "missing on this Python.",
        "- `.py` files only; `site-packages` excluded; test directories (`test`, `tests`, `idle_test`) "
        + ("in the training side" if c.get("test_dirs") else "excluded from training")
        + (" (the held-out list draws from them too)." if c.get("heldout_from_tests") else " (never held out)."),
        f"- evaluation: {c['eval_windows']} non-overlapping {c['eval_window_bytes']}-byte windows of the held-out "
        "files (evenly spaced), BOS prepended, every byte predicted.",
        "",
        "## Model",
        "- parameters: " + ", ".join(f"{k} {v:,}" for k, v in p.items()) + f"; total {sum(p.values()):,}; "
        f"stored as {b.get('checkpoint_dtype', 'float32')} (loaded as float32; every number here is measured on "
        "the stored weights).",
        "- " + architecture_words(b["config"]),
        f"- entropy threshold {e.get('threshold', float('nan')):.4f} nats; mean patch length on held-out windows "
        f"{b['mean_patch_len_heldout']:.2f} bytes (target 4).",
        "",
        "## Training",
        "| phase | steps | wall (min) | bytes seen | bytes/s | CPU |",
        "|---|---|---|---|---|---|",
    ]
    phases = (("entropy LM", e), ("BLT-D", b), ("baseline byte LM", base or {}))
    for name, d in phases:
        if d.get("steps"):
            lines.append(
                f"| {name} | {d['steps']} | {d['wall_s'] / 60:.1f} | {d['train_bytes']:,} | "
                f"{d['train_bytes'] / d['wall_s']:.0f} | {cpus_words(d.get('sittings', []))} |"
            )
    for name, d in phases:
        if len(d.get("sittings", [])) > 1:
            lines.append(f"\n{name} trained in {len(d['sittings'])} sittings: " + sittings_words(d["sittings"]) + ".")
    lines += method_lines(b)
    bpb = b["heldout_ar"]["bpb"]
    lines += [
        "",
        "## Held-out bits per byte (AR path)",
        "| model | params | bits/byte | top-1 |",
        "|---|---|---|---|",
        f"| BLT-D (AR path) | {sum(p.values()) - p['entropy']:,} (+ entropy {p['entropy']:,}) | {bpb:.3f} | "
        f"{b['heldout_ar']['top1']:.3f} |",
    ]
    if base:
        lines.append(
            f"| plain byte transformer, same wall clock | {base['params']:,} | {base['heldout']['bpb']:.3f} | "
            f"{base['heldout']['top1']:.3f} |"
        )
    else:
        lines.append("| plain byte transformer | (baseline not run yet) | | |")
    lines += ["", verdict(b, base)]
    if b.get("heldout_previous_list"):
        prev = b["heldout_previous_list"]
        lines.append(
            f"On the {prev['files']} files of the first held-out list "
            "(`fastblt/assets/heldout_files_until_2026-12-03.txt`, the headline files of defaults trained on "
            "library code only; windows "
            f"spread over their bytes the same way): BLT-D {prev['blt_d']:.3f}"
            + (f", baseline {prev['baseline']:.3f}." if "baseline" in prev else ".")
        )
    if base:
        cfg = base["config"]
        lines.append(
            f"Baseline: `EntropyModel` code (pre-norm SwiGLU, RoPE), d={cfg['dim']}, {cfg['n_layers']} layers, "
            f"window {cfg['window']}, peak lr {base['phase']['lr']:g}, {precision_words(base['phase'])}, "
            f"{INIT_WORDS[base['phase'].get('init', 'torch')]}, trained on the "
            f"same windows in its own process for {base['wall_s'] / 60:.0f} minutes "
            f"({threads_words(base.get('sittings', []))})."
        )
    if b.get("latent_use"):
        lines += latent_use_lines(b["latent_use"])
    if b.get("decoder_scales"):
        lines += decoder_scale_lines(b["decoder_scales"])
    if b.get("bits_by_patch_position"):
        lines += patch_position_lines(b["bits_by_patch_position"])
    if b.get("bits_by_file"):
        lines += file_lines(b["bits_by_file"], c["eval_window_bytes"])
    if r.get("notes"):
        lines += ["", "## Notes", "", r["notes"]]
    lines += ["", "## Masked-byte accuracy in the inference layout", ""]
    lines += [
        "One block of 8 cells at a natural patch start after a real held-out prefix; the model sees only the "
        "prefix and the block (M = 1). AR = teacher-forced next-byte top-1 on the same masked positions.",
        "",
        "| mask rate | masked acc | AR acc | cells |",
        "|---|---|---|---|",
    ]
    for rate, v in b["masked_acc_inference_layout"].items():
        lines.append(f"| {rate} | {v['masked_acc']:.3f} | {v['ar_acc']:.3f} | {v['cells']} |")
    lines += ["", "## Greedy samples in every mode", ""]
    lines += [
        "Through the runtime (`fastblt.Generator`, torch backend). The prompt is the 300 bytes of a held-out "
        "file ending with the `def` line shown; the continuation follows it.",
        "",
        "Python shape (`python_shape`): "
        + "; ".join(shape_summary(b["samples"], m) for m in ("ar", "blt-d") if any(m in x for x in b["samples"]))
        + ".",
        "",
    ]
    lines += sample_lines(b["samples"])
    lines += ["![loss curve](loss_curve.png)", ""]
    return "\n".join(lines)


def architecture_words(cfg: dict[str, Any]) -> str:
    """One line: every stack's layers x width (and window), slots, hash tables."""

    def stack(name: str, key: str) -> str:
        st = cfg[key]
        window = f", window {st['window']}" if st.get("window") else ""
        return f"{name} {st['n_layers']} x d={st['dim']}{window}"

    parts = [stack("encoder", "encoder"), stack("global", "global_model"), stack("decoder", "decoder")]
    parts += [stack("entropy model", "entropy")] if cfg.get("entropy") else []
    return (
        "; ".join(parts) + f"; k = {cfg['cross_attn_k']} slots per patch; hash n-grams {min(cfg['hash_sizes'])}-"
        f"{max(cfg['hash_sizes'])} x {cfg['hash_vocab']} buckets."
    )


INIT_WORDS = {
    "torch": "PyTorch's default initialisation",
    "scaled": "fan-in scaled truncated-normal initialisation (init.py, Meta's BLT scheme)",
}


def cpu_words(cpu: dict[str, Any]) -> str:
    bf16 = "native bf16" if cpu["native_bf16"] else "no native bf16"
    return f"{cpu['model']}, {cpu['cores']} cores, {cpu['isa']}, {bf16}"


def cpus_words(sittings: list[dict[str, Any]]) -> str:
    """A phase's CPU(s) for the training table (older runs did not record them)."""
    return "; ".join(dict.fromkeys(cpu_words(s["cpu"]) for s in sittings)) or "not recorded"


def threads_words(sittings: list[dict[str, Any]]) -> str:
    """A phase's torch threads (older runs did not record them; they always ran one)."""
    counts = list(dict.fromkeys(s["threads"] for s in sittings)) or [1]
    if counts == [1]:
        return "one torch thread per process"
    return "torch threads per process: " + " then ".join(map(str, counts))


def sittings_words(sittings: list[dict[str, Any]]) -> str:
    """Where a resumed phase trained: from which step and minute, on what, how."""
    return "; ".join(
        f"from step {s['from_step']} ({s['from_s'] / 60:.1f} min) on {cpu_words(s['cpu'])}, "
        f"{'bf16 autocast' if s['bf16'] else 'fp32'}, {s['threads']} thread(s)"
        for s in sittings
    )


def precision_words(ph: dict[str, Any]) -> str:
    """How a phase ran its forward passes (phases recorded before the bf16 option ran in fp32)."""
    if ph.get("bf16"):
        return "bf16 autocast forward passes (fp32 weights, optimizer, norms and loss)"
    return "fp32 forward passes"


def method_lines(b: dict[str, Any]) -> list[str]:
    ph = b["phase"]
    blocks = "all blocks" if ph.get("max_blocks") is None else f"a random {ph['max_blocks']} blocks per window"
    glr = ph.get("global_lr_mult", 1.0)
    global_lr = f" (global transformer {glr:g}x)" if glr != 1.0 else ""
    return [
        "",
        f"Method: AdamW (0.9, 0.95), peak lr {ph['lr']:g}{global_lr}, weight decay 0.1, grad clip 1.0, linear "
        f"warm-up then cosine to 10% over the phase's wall-clock budget; {threads_words(b.get('sittings', []))}; "
        f"{precision_words(ph)}; {INIT_WORDS[ph.get('init', 'torch')]}. BLT-D loss = mean "
        f"next-byte CE on the clean window + {ph.get('mask_weight', 1.0):g} x (sum over masked block cells of "
        "CE / max(t, 0.05), divided by the number of non-[PAD] block cells; one t ~ U(0,1) per window; [PAD] "
        f"excluded). Windows of {ph['seq_bytes']} bytes (BOS first), batch {ph['batch']}; blocks of 8 at every "
        f"patch start after the first, {blocks} kept "
        "(an unbiased estimate of the per-cell mask loss; the full set triples the decoder's length).",
    ]


def latent_use_lines(u: dict[str, float]) -> list[str]:
    return [
        "",
        "### Does the decoder use the global model?",
        "",
        "The headline windows again, each byte reading its own patch latent (as trained), the previous patch's "
        "(one patch stale, as a BLT-S draft does) or an all-zero latent.",
        "",
        "| latent read | bits/byte |",
        "|---|---|",
        f"| own (as trained) | {u['bpb_fresh_latent']:.4f} |",
        f"| previous patch's | {u['bpb_stale_latent']:.4f} |",
        f"| zeros | {u['bpb_zero_latent']:.4f} |",
        "",
        f"Greedy next byte equal with the own and the previous latent: {100 * u['greedy_agree_fresh_stale']:.2f}% "
        "of positions.",
    ]


def decoder_scale_lines(rows: list[dict[str, float]]) -> list[str]:
    lines = [
        "",
        "Residual-stream scales in the decoder (RMS per position, 16 headline windows): the latent enters only "
        "through the cross-attention, and the released doubled residual (2x + attn) doubles the stream at every "
        "cross-attention layer.",
        "",
        "| decoder layer | stream entering | cross-attention adds | self-attention adds | FFN adds |",
        "|---|---:|---:|---:|---:|",
    ]
    cell = lambda r, k: f"{r[k]:.2f}" if k in r else ""  # noqa: E731
    for r in rows:
        keys = ("stream_in", "cross_attn_adds", "self_attn_adds", "ffn_adds")
        lines.append(f"| {r['layer']} | " + " | ".join(cell(r, k) for k in keys) + " |")
    return lines


def patch_position_lines(rows: list[dict[str, Any]]) -> list[str]:
    last = len(rows) - 1
    lines = [
        "",
        "### Where the bits go: held-out bits per byte by position in the patch",
        "",
        "Position 0 is a patch's first byte (the first to read the newest global latent). Same bytes, same "
        "windows for both models.",
        "",
        "| position in patch | share of bytes | BLT-D bits/byte | baseline bits/byte |",
        "|---|---|---|---|",
    ]
    for row in rows:
        name = f"{row['position']}+" if row["position"] == last else str(row["position"])
        base = "" if row["baseline_bits"] is None else f"{row['baseline_bits']:.3f}"
        lines.append(f"| {name} | {100 * row['share']:.1f}% | {row['blt_d_bits']:.3f} | {base} |")
    return lines


def file_lines(t: dict[str, Any], n_bytes: int) -> list[str]:
    def cells(bpb: dict[str, float]) -> str:
        return f"{bpb['blt_d']:.3f} | " + (f"{bpb['baseline']:.3f}" if "baseline" in bpb else "")

    lines = [
        "",
        "### Held-out bits per byte file by file",
        "",
        f"Up to {t['per_file']} evenly spaced {n_bytes}-byte windows per held-out file (files shorter than a "
        "window have none). Share = the file's fraction of the headline evaluation windows, which are spread "
        "evenly over all held-out bytes.",
        "",
        "| file | bytes | windows | share of headline | BLT-D bits/byte | baseline bits/byte |",
        "|---|---|---|---|---|---|",
    ]
    for r in t["files"]:
        lines.append(
            f"| `{r['file']}` | {r['bytes']:,} | {r['windows']} | {100 * r['share']:.0f}% | {cells(r['bpb'])} |"
        )
    if t["without_largest"]:
        lines.append(f"| all held-out files but `{t['largest']}` | | | | {cells(t['without_largest'])} |")
    if t.get("test_files"):
        lines.append(f"| the {t['n_test_files']} held-out files in test directories | | | | {cells(t['test_files'])} |")
    lines += [
        f"| {t['n_train_windows']} random training windows (fixed seed) | | | | {cells(t['train_windows'])} |",
    ]
    return lines


def verdict(b: dict[str, Any], base: dict[str, Any] | None) -> str:
    bpb = b["heldout_ar"]["bpb"]
    goal = "meets the <= 1.5 goal" if bpb <= 1.5 else "misses the <= 1.5 goal"
    if bpb <= 1.3:
        goal += " and the <= 1.3 stretch"
    if not base:
        return f"BLT-D AR path: {bpb:.3f} bits/byte ({goal})."
    other = base["heldout"]["bpb"]
    cmp = "beats" if bpb < other else "does not beat"
    return f"BLT-D AR path: {bpb:.3f} bits/byte ({goal}); at equal training time it {cmp} the baseline ({other:.3f})."
