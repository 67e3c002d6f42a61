"""The training report's held-out bits per byte, measured through what a user deploys.

The embedded default's report scores 128 held-out windows of 1,024 bytes (BOS first) with the
PyTorch model's full forward: 1.450 bits per byte. Here the same windows go through the runtime
as prompts (`prompt_logprobs`: the prefill's causal pass over the step graphs, in chunks, with
incremental patching) on each backend, and through the server's scoring request (`echo`,
`logprobs`, `max_tokens` 0) on ort, and the bits per byte are set beside the reference's, window
by window. This is the claim "the deployed graphs compute what was trained" in the unit the model
was judged by.

    python benchmarks/deployed_bpb.py [--windows 128] [--backends ort,torch] [--no-server]

Writes benchmarks/results/deployed_bpb.{json,md,png}.
"""

from __future__ import annotations

import json
import math
import time

import click
import numpy as np
import torch
from common import machine_meta, save, targets_table
from tqdm import tqdm

from fastblt.formats.checkpoint import load_checkpoint, resolve_checkpoint_path
from fastblt.model.config import BYTE_OFFSET
from fastblt.runtime.generator import Generator
from fastblt.train.blt_d import eval_bpb
from fastblt.train.corpus import Corpus
from fastblt.train.loop import blt_forward

LN2 = math.log(2)
WINDOW_BYTES = 1024
# per window, deployed against reference, in bits per byte: fp32 rounding over 1,024 positions is
# ~1e-6; a wrong patch boundary or a stale cache entry costs far more than this
WINDOW_BOUND = 1e-3


def reference_bits(model, windows: torch.Tensor) -> np.ndarray:
    """Bits per byte of each window under the full forward with batched patching (the report's path)."""
    forward = blt_forward(model)
    out = []
    with torch.no_grad():
        for w in windows.split(8):
            logits = forward(w)[:, :-1].double()
            nats = torch.nn.functional.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none").sum(1)
            out += (nats / (w.shape[1] - 1) / LN2).tolist()
    return np.array(out)


def window_bytes(window: torch.Tensor) -> bytes:
    return bytes((window[1:] - BYTE_OFFSET).tolist())


def runtime_bits(g: Generator, windows: torch.Tensor, progress: tqdm) -> tuple[np.ndarray, float]:
    """Each window as a prompt: its bytes' log-probabilities from the prefill, one byte decoded."""
    out, t0 = [], time.perf_counter()
    for w in windows:
        gen = g.generate(window_bytes(w), mode="ar", max_bytes=1, prompt_logprobs=0, stop_on_eos=False)
        out.append(-sum(gen.prompt_logprobs) / len(gen.prompt_logprobs) / LN2)
        progress.update(1)
    return np.array(out), time.perf_counter() - t0


def server_bits(windows: torch.Tensor, progress: tqdm) -> tuple[np.ndarray, float]:
    """Each window as an OpenAI scoring request to `fastblt serve` on 127.0.0.1 (a prompt is a
    JSON string: the caller sends only windows that are UTF-8)."""
    import httpx

    from fastblt.serve.process import ServerProcess

    out, t0 = [], time.perf_counter()
    with ServerProcess(["--max-batch", "4"]) as srv, httpx.Client(timeout=300) as client:
        for w in windows:
            text = window_bytes(w).decode("utf-8")
            body = {"model": "fastblt-default", "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0}
            r = client.post(f"{srv.url}/v1/completions", json=body)
            r.raise_for_status()
            lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
            out.append(-sum(lps) / len(lps) / LN2)
            progress.update(1)
    return np.array(out), time.perf_counter() - t0


def render(result: dict) -> str:
    m = result["meta"]
    lines = [
        "# Held-out bits per byte through the deployed runtime",
        "",
        f"`python benchmarks/deployed_bpb.py` — {m['date']}, {m['machine']}, {m['cpu_count']} CPUs, onnxruntime "
        f"{m['onnxruntime']}. The embedded default's report: **{m['report_bpb']:.4f}** bits per byte on its 128 "
        f"held-out windows of {WINDOW_BYTES} bytes (BOS first), by the PyTorch model's full forward with batched "
        f"patching; this run scores the first {m['windows']} of them. Each path below scores the same windows: "
        "the runtime through `prompt_logprobs` (the prefill's causal pass over the step graphs, in chunks of "
        "the graphs' max_step, incremental patching), the server through OpenAI's scoring request (`echo`, "
        "`logprobs: 0`, `max_tokens: 0`).",
        "",
        "## Targets",
        "",
        *targets_table(result["targets"]),
        "",
        "| path | bits/byte | vs reference | max per-window difference | windows | seconds (server: with its start) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['path']} | {r['bpb']:.6f} | {r['bpb'] - result['reference_bpb']:+.2e} | {r['max_window_diff']:.2e} "
            f"| {r['windows']} | {r['seconds']:.1f} |"
        )
    lines += [
        "",
        f"Reference (this run's full forward): {result['reference_bpb']:.6f} bits per byte. A window's difference is "
        "the absolute difference of deployed and reference bits per byte; the bound, "
        f"{WINDOW_BOUND:g}, is far above fp32 rounding over 1,024 positions and far below what one wrong "
        "patch boundary or stale cache entry costs.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in result["rows"]:
        got, ref = np.array(r["window_bpb"]), np.array(r["reference_window_bpb"])
        ax.plot(ref, got - ref, "o", ms=3, label=r["path"])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("reference bits/byte of the window")
    ax.set_ylabel("deployed - reference (bits/byte)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


@click.command()
@click.option("--windows", "n_windows", type=click.IntRange(1, 128), default=128, show_default=True,
              help="Held-out windows (the report's 128, or fewer for a quick look).")  # fmt: skip
@click.option("--backends", default="ort,torch", show_default=True, help="Runtime backends, comma-separated.")
@click.option("--server/--no-server", default=True, show_default=True, help="Also score through `fastblt serve`.")
def main(n_windows: int, backends: str, server: bool) -> None:
    model = load_checkpoint("default").eval()
    report = json.loads((resolve_checkpoint_path("default") / "report.json").read_text())
    windows = Corpus.load().heldout_windows(WINDOW_BYTES, 128)[:n_windows]
    keep = [i for i, w in enumerate(windows) if _is_utf8(w)]  # the windows a JSON prompt can carry
    names = [b.strip() for b in backends.split(",") if b.strip()]
    total = len(windows) * len(names) + (len(keep) if server else 0)
    ref = reference_bits(model, windows)
    ref_all = eval_bpb(blt_forward(model), windows)["bpb"]
    rows = []
    with tqdm(total=total, desc="scoring windows", unit="window") as progress:
        for name in names:
            bits, seconds = runtime_bits(Generator("default", backend=name), windows, progress)
            rows.append(_row(f"runtime, {name}", bits, ref, seconds))
        if server:
            bits, seconds = server_bits(windows[keep], progress)
            rows.append(_row("server (ort), UTF-8 windows", bits, ref[keep], seconds))
    targets = [
        {"target": f"{r['path']}: max per-window difference (bits/byte)", "value": r["max_window_diff"],
         "bound": f"<= {WINDOW_BOUND:g}", "met": r["max_window_diff"] <= WINDOW_BOUND}
        for r in rows
    ]  # fmt: skip
    meta = machine_meta() | {"windows": len(windows), "report_bpb": report["blt_d"]["heldout_ar"]["bpb"]}
    result = {"meta": meta, "reference_bpb": ref_all, "rows": rows, "targets": targets}
    save("deployed_bpb", result, render, plot)


def _is_utf8(window: torch.Tensor) -> bool:
    try:
        window_bytes(window).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _row(path: str, bits: np.ndarray, ref: np.ndarray, seconds: float) -> dict:
    return {"path": path, "bpb": float(bits.mean()), "max_window_diff": float(np.abs(bits - ref).max()),
            "windows": len(bits), "seconds": seconds, "window_bpb": bits.tolist(),
            "reference_window_bpb": ref.tolist()}  # fmt: skip


if __name__ == "__main__":
    main()
