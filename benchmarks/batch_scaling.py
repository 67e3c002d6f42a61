"""Batching, measured where it happens: each step graph's cost per row at 1 to 64 rows, and whether
a request's bytes depend on its batch, over 1,000 requests.

    python benchmarks/batch_scaling.py                  # ~4 minutes on 2 cores
    python benchmarks/batch_scaling.py --backend torch  # parts 1 and 2 on the torch backend (~6 min)

1. Per graph (the embedded default's export, onnxruntime at the backend's own settings), one new
   position per row (the global step: one 4-byte patch per row, 256 cached patches), caches bound
   in place as the runtime binds them: microseconds per call and the throughput of a b-row call
   over a 1-row call. Also whether row r of a b-row call is bit-identical to that row alone.
2. 1,000 requests of every mode (greedy, and seeded sampling) on stdlib code prompts through an
   AsyncEngine at its defaults (max_batch 16, in two lanes on two or more cores), each compared
   with the same request run alone by Generator (whose global step uses every core; the lanes'
   steps one thread each).
3. In process, without HTTP: 16 requests of 256 bytes at once (`ar`, then `blt-s`, greedy and
   sampled) through an AsyncEngine at its defaults (lanes in worker processes where it has two
   or more), with the same lanes as threads, and with `lanes=1`, and one request alone on the
   default engine; aggregate bytes/s (median of three interleaved repeats).
4. Memory: 8, then 2 requests of 8,000-byte prompts at once in one batch of 8 rows: the peak bytes of the
   batch's global caches (its MirrorRows and any cache not lent to them), against what the same
   requests' caches hold on their own at that moment: a batch holds each cache once.
Results: benchmarks/results/batch_scaling.{json,md,png}; with --backend torch,
batch_scaling_torch.{json,md,png} (the torch backend's kernels may round a row differently in a
batch, so part 2 there counts how often that flips a byte).
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
# in process: greedy, and sampled at temperature 1 (the server's default), each request its own seed
SERVED = (("ar", 0.0), ("blt-s", 0.0), ("ar", 1.0), ("blt-s", 1.0))


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


def exactness(g, engine) -> dict:
    import asyncio

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

    async def run_all() -> list:
        return await asyncio.gather(*[engine.generate(p, mode=m, max_bytes=n, **o) for p, m, n, o in jobs])

    before = engine.stats
    t0 = time.perf_counter()
    got = [x.ids for x in asyncio.run(run_all())]
    batch_s = time.perf_counter() - t0
    stats = engine.stats
    calls = {s: stats.calls[s] - before.calls[s] for s in stats.calls}
    rows = {s: stats.rows[s] - before.rows[s] for s in stats.rows}
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
        "rows_per_call": {s: rows[s] / max(calls[s], 1) for s in calls},
        "lanes": len(engine.lanes),
    }


def global_cache_memory(g, requests: int, rows: int = 8, n: int = 8000) -> dict:
    """Peak bytes of a batch's global caches (sampled after every step call) against the same
    sequences' caches held alone, each sized to what it reads (spec.past_slots)."""
    from fastblt.export.spec import past_slots
    from fastblt.runtime.batch import BatchEngine
    from fastblt.runtime.options import make_request

    prompts = code_snippets(requests, ("email/message.py", "json/decoder.py", "json/encoder.py"), (n, n + 1),
                            seed=4, tail=n)  # fmt: skip
    batch = BatchEngine(g.engine, max_batch=rows)
    peak = {"batch": 0, "own": 0, "alone": 0}
    run = batch.runner.run

    def sampled(calls, neighbours=None) -> None:
        run(calls, neighbours)
        mirrors = sum(m.nbytes() for m in batch.runner._mirrors.values())
        own = alone = 0
        for seq in (s for s in batch.live if s is not None):
            for cache in seq.state.linear.values():
                own += 0 if cache.lent else cache.nbytes()
                alone += past_slots(max(seq.state.free_slot(), 1)) * cache.nbytes() // cache.slots
        if mirrors + own > peak["batch"]:
            peak.update(batch=mirrors + own, own=own, alone=alone)

    batch.runner.run = sampled
    t0 = time.perf_counter()
    tickets = [batch.submit(make_request(p, g.config, mode="ar", max_bytes=64, stop_on_eos=False)) for p in prompts]
    for t in tickets:
        t.result(600)
    seconds = time.perf_counter() - t0
    batch.close()
    mb = {k: v / 2**20 for k, v in peak.items()}
    print(f"memory, {requests} requests: batch global caches peak {mb['batch']:.0f} MB, alone {mb['alone']:.0f} MB",
          flush=True)  # fmt: skip
    return {"requests": requests, "rows": rows, "prompt_bytes": n, "seconds": seconds} | {
        f"{k}_mb": v for k, v in mb.items()
    }


def in_process(engines: dict) -> dict:
    """Aggregate bytes/s of 16 requests at once on each engine, and of one alone on the first."""
    import asyncio
    import statistics

    prompts = code_snippets(16, ("json/encoder.py", "string.py", "shlex.py"), (100, 300), seed=2, tail=2000)

    async def run(engine, ps: list[str], mode: str, temperature: float) -> float:
        t0 = time.perf_counter()
        kw = dict(mode=mode, max_bytes=256, stop_on_eos=False, temperature=temperature)
        outs = await asyncio.gather(*[engine.generate(p, seed=i, **kw) for i, p in enumerate(ps)])
        return sum(len(o.bytes) for o in outs) / (time.perf_counter() - t0)

    out = {}
    for mode, temperature in SERVED:
        first = next(iter(engines.values()))
        runs: dict[str, list[float]] = {"1 stream": [], **{f"16 streams, {k}": [] for k in engines}}
        for _ in range(3):
            runs["1 stream"].append(asyncio.run(run(first, prompts[:1], mode, temperature)))
            for name, engine in engines.items():
                runs[f"16 streams, {name}"].append(asyncio.run(run(engine, prompts, mode, temperature)))
        key = mode if temperature == 0 else f"{mode}, temperature {temperature:g}"
        out[key] = {k: statistics.median(v) for k, v in runs.items()}
        print(f"in process {key}: " + ", ".join(f"{k} {v:.0f} B/s" for k, v in out[key].items()), flush=True)
    return out


def render(r: dict) -> str:
    m = r["meta"]
    backend = m.get("backend", "ort")
    flag = "" if backend == "ort" else f" --backend {backend}"
    lines = [
        "# Batching: step graphs per row, and exactness per request",
        "",
        f"`python benchmarks/batch_scaling.py{flag}` — {m['date']}, {m['machine']}, {m['cpu_count']} CPUs, "
        f"onnxruntime {m['onnxruntime']}, the embedded default on the {backend} backend at its own settings.",
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
        f"## {e['requests']:,} requests, batched (max_batch 16 in {e.get('lanes', 1)} lane(s)) against each run alone",
        "",
        f"Every mode in turn, {e['sampled']} of them sampled with their own seed, 32 bytes each on stdlib code "
        f"prompts of 20-300 bytes: **{e['differ']} differ** ({modes}). "
        f"Batched {e['bytes'] / e['batched_s']:.0f} B/s, alone {e['bytes'] / e['alone_s']:.0f} B/s (prefill included); "
        "rows per backend call: " + ", ".join(f"{k} {v:.1f}" for k, v in e["rows_per_call"].items()) + ".",
        "",
    ]
    if "memory" in r:
        first = r["memory"][0]
        lines += [f"## Memory: the global caches of {first['prompt_bytes']:,}-byte prompts in a batch of "
                  f"{first['rows']} rows", "",
                  "| requests | batch peak MB | of it not lent | the same caches alone MB | batch / alone |",
                  "|---:|---:|---:|---:|---:|"]  # fmt: skip
        for mem in r["memory"]:
            lines.append(f"| {mem['requests']} | {mem['batch_mb']:.0f} | {mem['own_mb']:.0f} | {mem['alone_mb']:.0f} | "
                         f"{mem['batch_mb'] / mem['alone_mb']:.2f} |")  # fmt: skip
        lines += ["", "Sampled after every step call; `ar`, 64 bytes out. A request's cache is lent to its row of "
                  "the batch's MirrorRows (one buffer of the rows live requests hold, every row as long as the "
                  "longest), so the batch holds it once; alone, a cache holds what its request reads, rounded up "
                  "(spec.past_slots).", ""]  # fmt: skip
    if "in_process" in r:
        cols = list(next(iter(r["in_process"].values())))
        lines += ["## In process: 16 streams at once, no HTTP", "",
                  "16 requests of 256 bytes at once through an AsyncEngine (stdlib code prompts of 100-300 "
                  "bytes), greedy, and sampled at temperature 1 (the server's default; each request its own "
                  "seed), median of three interleaved repeats; `1 stream`: one request alone on the default "
                  "engine. The ratio is against it. Sampled text closes shorter patches (more global steps).", "",
                  "| mode | " + " | ".join(f"{c} B/s" for c in cols) + " | " + " | ".join(f"{c} x" for c in cols[1:])
                  + " |", "|---|" + "---:|" * (2 * len(cols) - 1)]  # fmt: skip
        for mode, row in r["in_process"].items():
            base = row[cols[0]]
            lines.append(f"| {mode} | " + " | ".join(f"{row[c]:.0f}" for c in cols) + " | "
                         + " | ".join(f"{row[c] / base:.2f}" for c in cols[1:]) + " |")  # fmt: skip
        lines.append("")
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
    ax.set_title(f"step graphs on {r['meta'].get('backend', 'ort')} (CPU): what a batch buys")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    import argparse

    from fastblt.runtime.async_engine import AsyncEngine
    from fastblt.runtime.generator import Generator

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("ort", "torch"), default="ort")
    backend = ap.parse_args().backend
    g = Generator("default", backend=backend)
    r = {"meta": machine_meta() | {"backend": backend}}
    r["graphs"] = graph_scaling(g.engine.backend)
    default = AsyncEngine("default", backend=backend, max_queue=N_REQUESTS)
    r["exactness"] = exactness(g, default)
    r["memory"] = [global_cache_memory(g, requests) for requests in (8, 2)]
    g.close()
    if backend != "ort":
        default.close()
        save(f"batch_scaling_{backend}", r, render, plot)
        return
    n = len(default.lanes)
    engines = {f"{n} lanes{' in processes' if default.processes else ''} (default)" if n > 1 else "1 lane (default)":
               default}  # fmt: skip
    if default.processes:
        engines[f"{n} lanes in threads"] = AsyncEngine("default", lanes=n, processes=False)
    engines["lanes=1"] = AsyncEngine("default", lanes=1)
    r["in_process"] = in_process(engines)
    for engine in engines.values():
        engine.close()
    save("batch_scaling", r, render, plot)


if __name__ == "__main__":
    main()
