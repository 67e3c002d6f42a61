"""`fastblt bench`: run the runtime benchmark, print one table, save .json / .md / .png.

    fastblt bench --json        # the embedded checkpoint, ort + torch, 3 prompts x 256 bytes, HF peer

Results go to benchmarks/results/runtime_bench.{json,md,png} (or --out DIR).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import click

from fastblt.bench.saved import load_result
from fastblt.errors import InputError
from fastblt.formats.files import write_atomic

OUTPUTS = ("runtime_bench.json", "runtime_bench.md", "runtime_bench.png")


def _calls_per_byte(row: dict) -> float:
    return sum(row["passes_per_byte"].values())


def _speed_note(row: dict, ar: dict) -> str:
    """Why a mode is (not) faster than ar: step calls per byte and time per call, measured."""
    c, c_ar = _calls_per_byte(row), _calls_per_byte(ar)
    t, t_ar = row["ms_per_byte"] / max(c, 1e-9), ar["ms_per_byte"] / max(c_ar, 1e-9)
    note = (
        f"{row['name']} makes {c:.2f} step calls per byte against ar's {c_ar:.2f} (a call-count bound of "
        f"{c_ar / c:.2f}x), at {t:.2f} ms per call against ar's {t_ar:.2f} (its calls carry more positions)"
    )
    if row["acceptance"] is not None:
        note += f"; {100 * row['acceptance']:.1f}% of drafted bytes verify"
        hist = {int(k): v for k, v in row["accept_hist"].items()}
        if hist:
            note += f" ({100 * hist.get(0, 0) / sum(hist.values()):.0f}% of rounds accept none)"
    if row.get("lookup_rounds"):
        note += (
            f"; {row['lookup_rounds']} of {row['rounds']} rounds drafted from the context "
            f"({100 * row['lookup_acceptance']:.0f}% of those drafts verify)"
        )
    if row["unmask_steps"]:
        blocks = sum(row["unmask_steps"].values())
        steps = sum(int(k) * v for k, v in row["unmask_steps"].items()) / max(blocks, 1)
        note += f"; {steps:.1f} diffusion passes per block"
    return note + "."


CALL_COST_NOTE = (
    "On this CPU a step call costs a few hundred microseconds whatever it computes (node overhead and "
    "attention over the local stacks' rings dominate a model this small), so speed follows the number of "
    "calls, not the weights read. A BLT-S draft byte from the decoder still costs an encoder and a decoder call "
    "(ar: entropy, encoder, decoder and a share of a global call), which bounds the paper's drafter near 1.5x "
    "even at full acceptance (blt-s/lookup0); greedy rounds whose last 8 bytes occurred before draft what "
    "followed them instead, with no draft call. Eq. 8's weight traffic is what the paper's GPU speedups follow."
)


def _devices_note(meta: dict) -> str:
    devices = meta.get("devices", {})
    if all(d == "cpu" for d in devices.values()):  # also: a record from before devices were recorded
        return ""
    return " Devices: " + ", ".join(f"{b} on {d}" for b, d in devices.items()) + "."


def _threads_label(meta: dict) -> str:
    n = meta.get("threads")
    return "each backend's default intra-op threads" if n is None else f"{n} intra-op thread(s) for every engine"


def render_markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# Runtime benchmark",
        "",
        f"Reproduce: `{meta['command']}`. {meta['date']}, {meta['machine']}, {meta['cpu_count']} CPUs "
        f"(load average at start {', '.join(f'{x:.1f}' for x in meta['load_avg_at_start'])}; the machine is shared), "
        f"{_threads_label(meta)}, batch 1, {meta['max_bytes']} new bytes per prompt "
        f"(EOS ignored), max_context {meta['max_context'] or 'default'}, checkpoint `{meta['checkpoint']}`. "
        f"torch {meta['torch']}, onnxruntime {meta['onnxruntime']}." + _devices_note(meta),
        "",
        "Prompts: " + ", ".join(f"`{p['file']}` ({p['bytes']} B)" for p in meta["prompts"]) + " (held-out files).",
        "",
        "| mode | backend | bytes/s | ms/byte | p50 / p95 ms | passes/byte ent/enc/glob/dec | accept | "
        "Eq.8 B/B this | 1B | 3B | host | = ar | ar bpb |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in result["rows"]:
        p = r["passes_per_byte"]
        dec = p.get("decoder", 0) + p.get("decoder_block", 0)
        acc = "" if r["acceptance"] is None else f"{100 * r['acceptance']:.1f}%"
        same = {True: "yes", False: "no"}.get(r.get("identical_to_ar"), "")
        if r["mode"] == "blt-d":
            same = f"{100 * r['ar_positional_agreement']:.0f}% pos"
        bpb = f"{r['ar_bits_per_byte']:.2f}" if "ar_bits_per_byte" in r else ""
        lines.append(
            f"| {r['name']} | {r['backend']} | {r['bytes_per_s']:.0f} | {r['ms_per_byte']:.2f} | "
            f"{r['latency_p50_ms']:.2f} / {r['latency_p95_ms']:.2f} | "
            f"{p.get('entropy', 0):.2f}/{p.get('encoder', 0):.2f}/{p.get('global', 0):.2f}/{dec:.2f} | {acc} | "
            f"{_si(r['eq8']['this']['bytes_per_byte'])} | {_si(r['eq8']['blt-1b']['bytes_per_byte'])} | "
            f"{_si(r['eq8']['blt-3b']['bytes_per_byte'])} | {100 * r['host_fraction']:.0f}% | {same} | {bpb} |"
        )
    hf = result.get("hf")
    if hf:
        same = ", ".join(f"{b}: {'yes' if v else 'no'}" for b, v in hf["identical_to_ar"].items())
        lines += [
            "",
            f"Peer: {hf['name']} (transformers {hf['transformers']}) on the same weights, "
            f"{len(hf['prompts'])} prompt(s): **{hf['bytes_per_s']:.2f} bytes/s**; "
            f"greedy output identical to ar: {same}.",
        ]
    lines += ["", "## Targets", "", "| target | value | bound | lossless | met |", "|---|---:|---|---|---|"]
    for t in result["targets"]:
        loss = "" if t["lossless"] is None else ("yes" if t["lossless"] else "no")
        lines.append(
            f"| {t['target']} | {t['value']:.4f} | {t['bound']} | {loss} | {'yes' if t['met'] else '**no**'} |"
        )
    lines += ["", "## Notes", ""] + [f"- {n}" for n in result.get("notes", [])]
    lines += [
        "",
        "Columns: bytes/s and ms/byte exclude the prompt's prefill; p50/p95 are the gaps between successive "
        "verified bytes (speculative modes verify bytes in bursts, so their p50 is ~0); passes/byte per module "
        "(decoder includes diffusion-block passes); Eq. 8 B/B = bytes of weights read per generated byte "
        "(2 bytes/param, encoder without hash tables + hash rows read, entropy model excluded as in the paper), "
        "for this checkpoint and projected on the paper's BLT 1B / 3B splits with this run's passes; host = share "
        "of wall time outside the backend; = ar: greedy output identical to ar (blt-d: positional agreement); "
        "ar bpb: bits per byte the model's causal path assigns to the output (lower = closer to what ar would write).",
    ]
    return "\n".join(lines) + "\n"


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def notes_for(result: dict) -> list[str]:
    """Why each missed target was missed, from the measured numbers; then the block-start comparison."""
    rows = {(r["name"], r["backend"]): r for r in result["rows"]}
    notes, explained_cost = [], False
    for t in result["targets"]:
        if t["met"]:
            continue
        line = f"Missed: {t['target']} = {t['value']:.4f} (target {t['bound']})."
        if t["lossless"] is False:
            line += " The output differs from ar's (see the = ar column)."
        mode, _, rest = t["target"].partition(" vs ar on ")
        if rest:
            backend = rest.split(" ")[0]
            line += " " + _speed_note(rows[(mode, backend)], rows[("ar", backend)])
            explained_cost = True
        elif t["target"].startswith("ar on ort vs HF"):
            line += " The peer recomputes the whole model per byte, so its speed falls with the context length."
        elif "Eq. 8" in t["target"]:
            line += " " + _eq8_note(result)
        elif t["target"].startswith("host"):
            line += " Host time is hashing, patch bookkeeping, feeds and cache writes in Python."
        notes.append(line)
    if explained_cost and all(d == "cpu" for d in result["meta"].get("devices", {}).values()):
        notes.append(CALL_COST_NOTE)
    return notes + block_start_notes(result)


def _eq8_note(result: dict) -> str:
    backend = result["rows"][0]["backend"]
    rows = {r["name"]: r for r in result["rows"] if r["backend"] == backend}
    ar, d = rows["ar"]["passes_per_byte"], rows["blt-d"]["passes_per_byte"]
    dec = lambda p: p.get("decoder", 0) + p.get("decoder_block", 0)  # noqa: E731
    return (
        f"blt-d reads the decoder {dec(d):.2f} times per byte (ar: {dec(ar):.2f}) and the global model "
        f"{d.get('global', 0):.3f} times (ar: {ar.get('global', 0):.3f}): the global savings are there, but with "
        "few cells unmasked per diffusion pass the decoder passes do not fall, and the decoder's share of the "
        "weights decides the rest."
    )


def block_start_notes(result: dict) -> list[str]:
    rows = {(r["name"], r["backend"]): r for r in result["rows"]}
    backend = result["rows"][0]["backend"] if result["rows"] else None
    out = []
    for force, patch in (("blt-dv/force", "blt-dv"), ("blt-dv/alpha0.3/force", "blt-dv/alpha0.3")):
        a, b = rows.get((force, backend)), rows.get((patch, backend))
        if a and b and a["acceptance"] is not None and b["acceptance"] is not None:
            better = "force" if a["acceptance"] >= b["acceptance"] else "patch"
            out.append(
                f"Block start, {patch} drafting on {backend}: acceptance force {100 * a['acceptance']:.1f}% vs patch "
                f"{100 * b['acceptance']:.1f}% ({a['bytes_per_s']:.0f} vs {b['bytes_per_s']:.0f} bytes/s): "
                f"'{better}' verifies more drafts."
            )
    a, b = rows.get(("blt-d", backend)), rows.get(("blt-d/patch", backend))
    if a and b and "ar_bits_per_byte" in a:
        agree = (
            (a["ar_positional_agreement"], a["ar_prefix_agreement"]),
            (
                b["ar_positional_agreement"],
                b["ar_prefix_agreement"],
            ),
        )
        verdict = "no difference" if agree[0] == agree[1] else ("'force'" if agree[0] > agree[1] else "'patch'")
        out.append(
            f"Block start, blt-d quality on {backend}: agreement with ar's greedy output (positional / prefix) "
            f"force {100 * agree[0][0]:.0f}% / {100 * agree[0][1]:.0f}% vs patch {100 * agree[1][0]:.0f}% / "
            f"{100 * agree[1][1]:.0f}%: {verdict}. Bits per byte of the output under the causal path: force "
            f"{a['ar_bits_per_byte']:.2f}, patch {b['ar_bits_per_byte']:.2f}, ar's own {_ar_bpb(rows, backend)} "
            "(lower than ar's own means repetitive text the model finds easy, e.g. runs of spaces: not better text)."
        )
    return out


def _ar_bpb(rows: dict, backend: str) -> str:
    ar = rows.get(("ar", backend), {})
    return f"{ar['ar_bits_per_byte']:.2f}" if "ar_bits_per_byte" in ar else "?"


def chart_png(result: dict) -> bytes:
    """The bytes/s bar chart as PNG bytes (written by the caller, once everything rendered)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "/" not in r["name"]]
    labels = [f"{r['name']}\n{r['backend']}" for r in rows]
    values = [r["bytes_per_s"] for r in rows]
    colors = ["#4c72b0" if r["backend"] == "ort" else "#dd8452" for r in rows]
    if result.get("hf"):
        labels.append("HF peer\ntorch")
        values.append(result["hf"]["bytes_per_s"])
        colors.append("#8c8c8c")
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4))
    ax.bar(range(len(values)), values, color=colors)
    ax.set_yscale("log")
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set_ylabel("generated bytes/s (log)")
    meta = result["meta"]
    ax.set_title(f"fastblt runtime, {meta['max_bytes']} bytes, batch 1, {_threads_label(meta)}", fontsize=10)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.0f}" if v >= 10 else f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


@click.command("bench")
@click.option("--checkpoint", default="default", show_default=True)
@click.option("--backends", default="ort,torch", show_default=True, help="Comma-separated: ort, torch, trt.")
@click.option("--max-bytes", type=int, default=256, show_default=True)
@click.option("--prompts", type=click.IntRange(1, 3), default=3, show_default=True)
@click.option("--max-context", type=int, default=None, help="Limit on ids per call [default: the model's].")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Intra-op threads of every engine and the peer [default: each one's own].",
)
@click.option("--device", default=None, help="torch/trt backends: cpu, cuda, cuda:1 (ort: its providers decide).")
@click.option("--artifacts", default=None, help="trt: the export directory holding the engines (fastblt build).")
@click.option(
    "--cuda-graphs/--no-cuda-graphs",
    default=None,
    help="torch on CUDA: replay step calls as CUDA graphs [default: on].",
)
@click.option("--hf/--no-hf", default=True, show_default=True, help="Run the transformers peer.")
@click.option("--hf-prompts", type=click.IntRange(1, 3), default=1, show_default=True)
@click.option("--comparison/--no-comparison", default=True, show_default=True, help="Block-start / drafting variants.")
@click.option("--out", default="benchmarks/results", show_default=True, help="Directory for runtime_bench.*")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON record instead of the markdown table.")
@click.option("--render", default=None, help="Re-render a saved runtime_bench.json (no measurement).")
def bench(
    checkpoint, backends, max_bytes, prompts, max_context, threads, device, artifacts, cuda_graphs, hf, hf_prompts,
    comparison, out, as_json, render,
):  # fmt: skip
    """Benchmark every mode x backend on fixed prompts (+ the Hugging Face peer)."""
    from fastblt.bench.runtime import BenchConfig, evaluate_targets, run_bench

    out_dir = _check_out(Path(out))
    if render is not None:
        source = Path(render)
        result = load_result(source)
        try:  # numbers the checks let through can still break the arithmetic (an ar row at 0 bytes/s)
            result["targets"] = evaluate_targets(result)
            files, md = _render(result)
        except (ArithmeticError, KeyError, IndexError, TypeError, ValueError) as e:
            raise InputError(f"--render {source}: cannot render it ({type(e).__name__}: {e})") from None
        _report(result, md, _write(files, out_dir, keep=source), as_json)
        return

    names = tuple(b.strip() for b in backends.split(",") if b.strip())
    bad = [b for b in names if b not in ("ort", "torch", "trt")]
    if bad or not names:
        raise click.BadParameter(f"{bad or backends!r}: choose from ort, torch, trt", param_hint="--backends")
    cfg = BenchConfig(
        checkpoint, names, max_bytes, prompts, max_context, threads, hf, min(hf_prompts, prompts), comparison,
        device=device, artifacts=artifacts, cuda_graphs=cuda_graphs,
    )  # fmt: skip
    result = run_bench(cfg, log=lambda s: click.echo(s, err=True))
    files, md = _render(result)
    _report(result, md, _write(files, out_dir), as_json)


def _check_out(out_dir: Path) -> Path:
    """--out must be (or become) a directory whose runtime_bench.* are plain files: checked before
    any measurement or rendering, so a bad --out costs neither."""
    existing = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "" if existing == out_dir else f" ({existing} is not a directory)"
        raise InputError(f"--out {out_dir}: not a directory{where}")
    for name in OUTPUTS:
        path = out_dir / name
        if path.exists() and not path.is_file():
            raise InputError(f"--out {out_dir}: {name} exists and is not a regular file")
    return out_dir


def _render(result: dict) -> tuple[dict[str, bytes], str]:
    """Every output file's bytes, in memory: nothing is written until all of them rendered."""
    result["notes"] = notes_for(result)
    md = render_markdown(result)
    files = {
        "runtime_bench.json": (json.dumps(result, indent=2, default=str) + "\n").encode(),
        "runtime_bench.md": md.encode(),
        "runtime_bench.png": chart_png(result),
    }
    return files, md


def _write(files: dict[str, bytes], out_dir: Path, keep: Path | None = None) -> list[Path]:
    """Each file replaced atomically; returns the paths written. `keep` (the --render input) is
    never rewritten: it holds the measurements, and the .md / .png are what a re-render is for."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {out_dir}: cannot create it ({e.strerror or e})") from None
    written = []
    for name, data in files.items():
        path = out_dir / name
        if keep is not None and _same_file(path, keep):
            continue
        try:
            write_atomic(path, data)
        except OSError as e:
            raise InputError(f"--out {out_dir}: cannot write {name} ({e.strerror or e})") from None
        written.append(path)
    return written


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _report(result: dict, md: str, written: list[Path], as_json: bool) -> None:
    click.echo(json.dumps(result, indent=2, default=str) if as_json else md)
    click.echo("saved " + ", ".join(map(str, written)), err=True)
