"""Batching, measured where it happens: each step graph's cost per row at 1 to 64 rows, and whether
a request's bytes depend on its batch, over 1,000 requests.

    python benchmarks/batch_scaling.py            # ~3 minutes on 2 cores

1. Per graph (the embedded default's export, onnxruntime at the backend's own settings), one new
   position per row (the global step: one 4-byte patch per row, 256 cached patches), caches bound
   in place as the runtime binds them: microseconds per call and the throughput of a b-row call
   over a 1-row call. Also whether row r of a b-row call is bit-identical to that row alone.
2. 1,000 requests of every mode (greedy, and seeded sampling) on stdlib code prompts through the
   batch engine (max_batch 16), each compared with the same request run alone by Generator.
Results: benchmarks/results/batch_scaling.{json,md,png}.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from common import code_snippets, machine_meta, save

ROWS = (1, 4, 16, 64)
STEPS = ("entropy", "encoder", "decoder", "decoder_block", "global")
MODES = ("ar", "blt-s", "blt-d", "blt-dv")
N_REQUESTS = 1000


def feeds(spec, rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of one step for `rows` rows: one new position (patch), positions well inside the caches."""
    g = torch.Generator().manual_seed(seed)
    sizes = {"batch": rows, "new": 1, "patches": 1, "patch_len": 4, "past": 256}
    out = {}
    for t in spec.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in t.shape]
        if t.dtype == "int32":
            high = {"start": 200, "patch_lens": 5}.get(t.name, 4)
            out[t.name] = torch.randint(1 if t.name != "read_patch" else 0, high, shape, generator=g, dtype=torch.int32)
        else:
            out[t.name] = torch.randn(shape, generator=g) * 0.1
    if "patch_lens" in out:
        out["patch_lens"].fill_(4)
    return out


def graph_scaling(backend) -> dict:
    rows_out = {}
    for step in STEPS:
        spec = backend.specs[step]
        reads = [t.name for t in spec.outputs if t.name not in dict(spec.aliases)]
        per = {}
        for b in ROWS:
            f = feeds(spec, b)
            backend.run_step(step, f, check=False)
            n = max(10, 400 // b)
            t0 = time.perf_counter()
            for _ in range(n):
                backend.run_step(step, f, check=False)
            per[b] = (time.perf_counter() - t0) / n
        exact = True
        if reads:
            f = feeds(spec, 16, seed=1)
            out = backend.run_step(step, {n: v.clone() for n, v in f.items()}, check=False)
            whole = {k: out[k].clone() for k in reads}
            for r in range(16):
                alone = backend.run_step(step, {n: v[r : r + 1].clone() for n, v in f.items()}, check=False)
                exact &= all(torch.equal(alone[k][0], whole[k][r]) for k in reads)
        rows_out[step] = {
            "us_per_call": {str(b): 1e6 * t for b, t in per.items()},
            "throughput_vs_1": {str(b): per[1] * b / t for b, t in per.items()},
            "rows_bit_exact": exact,
        }
        print(
            step,
            " ".join(f"{b}:{1e6 * t:.0f}us" for b, t in per.items()),
            "exact" if exact else "NOT exact",
            flush=True,
        )
    return rows_out


def code_prompts(n: int) -> list[str]:
    """n prompts of stdlib code, 20 to 300 bytes each, starting at line boundaries."""
    return code_snippets(n, ("json/decoder.py", "email/message.py", "textwrap.py"), (20, 300), seed=1, tail=1000)


def exactness(g) -> dict:
    from fastblt.runtime.batch import BatchEngine
    from fastblt.runtime.options import make_request

    prompts = code_prompts(N_REQUESTS)
    jobs = []
    for i, p in enumerate(prompts):
        opts = {"stop_on_eos": False}
        if i % 4 == 3:
            opts |= {"temperature": 0.8, "top_k": 40, "seed": i}
        jobs.append((p, MODES[i % 4], 32, opts))
    t0 = time.perf_counter()
    want = [g.generate(p, mode=m, max_bytes=n, **o).ids for p, m, n, o in jobs]
    alone_s = time.perf_counter() - t0
    with BatchEngine(g.engine, max_batch=16, max_queue=N_REQUESTS) as batch:
        t0 = time.perf_counter()
        tickets = [batch.submit(make_request(p, g.config, m, n, **o)) for p, m, n, o in jobs]
        got = [t.result(1200).ids for t in tickets]
        batch_s = time.perf_counter() - t0
        stats = batch.stats
    differ = [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
    by_mode = {m: sum(1 for i in differ if jobs[i][1] == m) for m in MODES}
    print(f"exactness: {len(differ)} of {len(jobs)} requests differ from batch 1", flush=True)
    return {
        "requests": len(jobs),
        "differ": len(differ),
        "differ_by_mode": by_mode,
        "sampled": sum(1 for j in jobs if "seed" in j[3]),
        "bytes": sum(len(x) for x in got),
        "alone_s": alone_s,
        "batched_s": batch_s,
        "rows_per_call": {s: stats.rows[s] / max(stats.calls[s], 1) for s in stats.calls},
    }


def render(r: dict) -> str:
    m = r["meta"]
    lines = [
        "# Batching: step graphs per row, and exactness per request",
        "",
        f"`python benchmarks/batch_scaling.py` — {m['date']}, {m['machine']}, {m['cpu_count']} CPUs, onnxruntime "
        f"{m['onnxruntime']}, the embedded default's export at the ort backend's own settings.",
        "",
        "## Each graph at 1 to 64 rows (one new position per row; global: one 4-byte patch, 256 cached)",
        "",
        "| graph | "
        + " | ".join(f"{b} row{'s' if b > 1 else ''} us" for b in ROWS)
        + " | "
        + " | ".join(f"x{b} throughput" for b in ROWS[1:])
        + " | rows bit-exact |",
        "|---|" + "---:|" * (2 * len(ROWS) - 1) + ":-:|",
    ]
    for step, row in r["graphs"].items():
        us = " | ".join(f"{row['us_per_call'][str(b)]:.0f}" for b in ROWS)
        x = " | ".join(f"{row['throughput_vs_1'][str(b)]:.1f}" for b in ROWS[1:])
        lines.append(f"| {step} | {us} | {x} | {'yes' if row['rows_bit_exact'] else '**no**'} |")
    e = r["exactness"]
    modes = ", ".join(f"{k} {v}" for k, v in e["differ_by_mode"].items())
    lines += [
        "",
        "x b throughput: rows per second of a b-row call over a 1-row call. rows bit-exact: each row of a",
        "16-row call equals that row run alone, every output element.",
        "",
        f"## {e['requests']:,} requests, batched (max_batch 16) against each run alone",
        "",
        f"Every mode in turn, {e['sampled']} of them sampled with their own seed, 32 bytes each on stdlib code "
        f"prompts of 20-300 bytes: **{e['differ']} differ** ({modes}). "
        f"Batched {e['bytes'] / e['batched_s']:.0f} B/s, alone {e['bytes'] / e['alone_s']:.0f} B/s (prefill included); "
        "rows per backend call: " + ", ".join(f"{k} {v:.1f}" for k, v in e["rows_per_call"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for step, row in r["graphs"].items():
        ax.plot(ROWS, [row["throughput_vs_1"][str(b)] for b in ROWS], marker="o", label=step)
    ax.plot(ROWS, ROWS, ls=":", color="gray", label="ideal")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("rows per call")
    ax.set_ylabel("throughput vs 1 row")
    ax.set_title("step graphs on onnxruntime (CPU): what a batch buys")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    from fastblt.runtime.generator import Generator

    g = Generator("default")
    r = {"meta": machine_meta()}
    r["graphs"] = graph_scaling(g.engine.backend)
    r["exactness"] = exactness(g)
    save("batch_scaling", r, render, plot)


if __name__ == "__main__":
    main()
