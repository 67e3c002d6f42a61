"""n choices of one prompt: a lane prefills the prompt once and its other choices start from a copy.

    python benchmarks/shared_prefill.py    # ~1 minute on 2 cores

An AsyncEngine at its defaults (but without prompt snapshots: the second and third repeats would
load the first's prompts) takes 8 sampled `ar` requests at once, 64 bytes each, in two ways
side by side (median of three interleaved repeats) for prompts of 250, 1,000 and 3,000 bytes of
stdlib code: one prompt with 8 seeds (what `n: 8` asks of `fastblt serve`: the choices share the
prefill), and 8 different prompts of the same length (each request prefills its own). Reported:
the prefills the engine shared, the wall time until the last choice ends and until every choice
has its first byte, and whether every choice equals its seeded request run alone by Generator.

Results: benchmarks/results/shared_prefill.{json,md,png}.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

from common import code_snippets, grouped_bars, machine_meta, save

N = 8
LENGTHS = (250, 1000, 3000)
MAX_BYTES = 64
SOURCES = ("argparse.py", "email/message.py", "textwrap.py")


async def choices(engine, prompts: list[str]) -> tuple[float, float, list[str]]:
    """Seconds until every request has its first chunk and until the last one ends; their texts."""
    t0 = time.perf_counter()
    firsts: list[float] = []

    async def one(i: int, prompt: str) -> str:
        stream = engine.stream(prompt, mode="ar", max_bytes=MAX_BYTES, temperature=1.0, seed=i, stop_on_eos=False)
        parts = []
        async for text in stream:
            if not parts:
                firsts.append(time.perf_counter() - t0)
            parts.append(text)
        return "".join(parts)

    texts = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
    return max(firsts), time.perf_counter() - t0, texts


def measure(engine, length: int) -> dict:
    distinct = code_snippets(N, SOURCES, (length, length + 1), seed=length, tail=4000)
    same = [distinct[0]] * N
    runs: dict[str, dict[str, list[float]]] = {k: {"first": [], "last": [], "shared": []} for k in ("same", "distinct")}
    texts = None
    for _ in range(3):
        for name, prompts in (("same", same), ("distinct", distinct)):
            before = engine.stats.shared_prefills
            first, last, out = asyncio.run(choices(engine, prompts))
            runs[name]["first"].append(first)
            runs[name]["last"].append(last)
            runs[name]["shared"].append(engine.stats.shared_prefills - before)
            texts = out if name == "same" else texts
    row = {"prompt_bytes": length}
    for name, r in runs.items():
        row[name] = {k: statistics.median(v) for k, v in r.items()}
    alone = [engine.generator.generate(same[0], mode="ar", max_bytes=MAX_BYTES, temperature=1.0, seed=i,
                                       stop_on_eos=False).text for i in range(N)]  # fmt: skip
    row["differ_from_alone"] = sum(a != b for a, b in zip(alone, texts, strict=True))
    same_s, distinct_s = row["same"]["last"], row["distinct"]["last"]
    print(f"{length} B: one prompt {same_s:.2f} s ({row['same']['shared']:.0f} shared), {N} prompts "
          f"{distinct_s:.2f} s; differ from alone: {row['differ_from_alone']}", flush=True)  # fmt: skip
    return row


def render(r: dict) -> str:
    m = r["meta"]
    lines = [
        "# n choices of one prompt: one prefill per lane",
        "",
        f"`python benchmarks/shared_prefill.py` — {m['date']}, {m['machine']}, {m['cpu_count']} CPUs, onnxruntime "
        f"{m['onnxruntime']}. An AsyncEngine at its defaults ({r['lanes']} lane(s), max_batch {r['max_batch']}) "
        "without prompt snapshots (`prompt_cache_mb=0`: repeats would load the first one's prompts); "
        f"{N} sampled `ar` requests at once, {MAX_BYTES} bytes each, median of three interleaved repeats.",
        "",
        f"| prompt bytes | prefills shared, one prompt x {N} | first byte of all, one prompt s | {N} prompts s | "
        f"last choice done, one prompt s | {N} prompts s | {N} prompts / one prompt | choices != alone |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        s, d = row["same"], row["distinct"]
        lines.append(f"| {row['prompt_bytes']:,} | {s['shared']:.0f} of {N - 1} | {s['first']:.2f} | "
                     f"{d['first']:.2f} | {s['last']:.2f} | {d['last']:.2f} | {d['last'] / s['last']:.2f}x | "
                     f"{row['differ_from_alone']} |")  # fmt: skip
    lines += [
        "",
        f"One prompt x {N}: the requests `n: {N}` makes of `fastblt serve` (seeds 0..{N - 1}); a lane's first "
        "request prefills the prompt, the others admitted while it does wait and take a copy of its state. "
        f"{N} prompts: stdlib snippets of the same length, each prefilled by its own request (the work "
        "otherwise the same). choices != alone: choices of the one prompt whose text differs from the "
        "same seeded request run alone by Generator.",
        "",
    ]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    rows = r["rows"]
    grouped_bars(path, [f"{row['prompt_bytes']:,} B" for row in rows],
                 [(f"one prompt x {N} (shared)", [row["same"]["last"] for row in rows]),
                  (f"{N} prompts", [row["distinct"]["last"] for row in rows])],
                 f"seconds until {N} choices end",
                 f"{N} sampled choices of {MAX_BYTES} bytes: prefilled once per lane or {N} times")  # fmt: skip


def main() -> None:
    from fastblt.runtime.async_engine import AsyncEngine

    engine = AsyncEngine("default", prompt_cache_mb=0)
    try:
        r = {"meta": machine_meta(), "lanes": len(engine.lanes), "max_batch": engine.max_batch}
        r["rows"] = [measure(engine, length) for length in LENGTHS]
    finally:
        engine.close()
    save("shared_prefill", r, render, plot)


if __name__ == "__main__":
    main()
