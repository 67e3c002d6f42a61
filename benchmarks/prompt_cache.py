"""Prompt snapshots: what a prompt sent again or continued saves, and what keeping them costs.

    python benchmarks/prompt_cache.py    # ~4 minutes on 2 cores

Two Generators on ort at their defaults but for prompt_cache_mb (64 MB and 0), side by side:
- per prompt (stdlib code of 250, 1,000 and 3,000 bytes, 7 prompts each, greedy `ar`, 16 bytes):
  snapshots off (every call commits its prompt), on with the prompt new (it commits it and keeps
  snapshots), and on with the prompt sent again (it loads one). Reported: the median time to the
  first byte (the prompt's commit and the first byte's step calls), the snapshot's size, and
  whether the three give the same bytes;
- a conversation (5 conversations of 4 turns): turn 1 is 600 bytes of code, each next turn the
  last prompt, its 16-byte answer and 400 more bytes of code; per turn, time to the first byte
  with snapshots and without, and the bytes;
- scoring: 5 contexts of 1,000 bytes, each with 4 continuations, prompt_logprobs 1 (an evaluation
  harness's loglikelihood requests): seconds per request, and whether every score is the same.
Then an AsyncEngine at its defaults (every lane, the router sending a prompt back to the lane that
last took it): a 1,000-byte prompt sent 6 times one after another (a user's regenerate button:
sampled, a seed each), first request against the others. And many clients: 16 at once sending 16
prompts of 1,000 bytes 6 times each in a shuffled order (greedy `ar`, 32 bytes), with the lanes
sharing their snapshots (the default) and with each lane finding only its own, alternated twice.

Results: benchmarks/results/prompt_cache.{json,md,png}.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from pathlib import Path

from common import code_snippets, grouped_bars, machine_meta, save

from fastblt.model.tokenizer import encode
from fastblt.runtime.prompt_cache import prompt_keys

LENGTHS = (250, 1000, 3000)
PER_LENGTH = 7
MAX_BYTES = 16
AGAIN = 6
CONVERSATIONS, TURNS = 5, 4
CONTINUATIONS = 4
SOURCES = ("argparse.py", "email/message.py", "textwrap.py")
CLIENTS, POOL, SENDS, CLIENT_BYTES, ROUNDS = 16, 16, 6, 32, 2


def measure(off, on, length: int) -> dict:
    prompts = code_snippets(PER_LENGTH, SOURCES, (length, length + 1), seed=length, tail=4000)
    ttfb: dict[str, list[float]] = {"off": [], "new": [], "again": []}
    sizes, differ = [], 0
    for prompt in prompts:
        outs = {}
        for name, g in (("off", off), ("new", on), ("again", on)):
            out = g.generate(prompt, mode="ar", max_bytes=MAX_BYTES, stop_on_eos=False)
            ttfb[name].append(out.stats.ttfb_s)
            outs[name] = out
        snap = on.engine.prompts.peek(prompt_keys(encode(prompt), on.engine.max_step)[0][1]).snap  # at its cut
        sizes.append(snap.nbytes())
        assert outs["again"].stats.prompt_cached > 0 and outs["new"].stats.prompt_cached == 0
        differ += not (outs["off"].bytes == outs["new"].bytes == outs["again"].bytes)
    row = {"prompt_bytes": length, "differ": differ, "snapshot_mb": statistics.median(sizes) / 2**20}
    row["save_ms"] = 1e3 * statistics.median(save_seconds(off, prompt) for prompt in prompts)
    row |= {f"ttfb_{k}": statistics.median(v) for k, v in ttfb.items()}
    print(f"{length} B: first byte off {row['ttfb_off'] * 1e3:.1f} ms, new {row['ttfb_new'] * 1e3:.1f} ms, "
          f"again {row['ttfb_again'] * 1e3:.1f} ms; snapshot {row['snapshot_mb']:.1f} MB; differ {differ}",
          flush=True)  # fmt: skip
    return row


def save_seconds(g, prompt: str) -> float:
    """What taking one snapshot of a committed prompt costs (SequenceState.save), median of 3."""
    st = g.engine.acquire()
    try:
        st.run(st.prefill(encode(prompt), g.engine.max_step))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            st.save()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        g.engine.release(st)


def conversation(off, on) -> list[dict]:
    """Per turn: median time to the first byte with snapshots off and on, prompt ids loaded, bytes
    that differ."""
    texts = code_snippets(CONVERSATIONS * TURNS, SOURCES, (600, 601), seed=11, tail=4000)
    rows = [{"turn": t + 1, "off": [], "on": [], "loaded": [], "differ": 0, "bytes": []} for t in range(TURNS)]
    for c in range(CONVERSATIONS):
        prompt = ""
        for t, row in enumerate(rows):
            prompt += texts[c * TURNS + t][: 600 if t == 0 else 400]
            a = off.generate(prompt, mode="ar", max_bytes=MAX_BYTES, stop_on_eos=False)
            b = on.generate(prompt, mode="ar", max_bytes=MAX_BYTES, stop_on_eos=False)
            row["off"].append(a.stats.ttfb_s)
            row["on"].append(b.stats.ttfb_s)
            row["loaded"].append(b.stats.prompt_cached)
            row["bytes"].append(len(prompt.encode()))
            row["differ"] += a.bytes != b.bytes
            prompt += b.text
    out = []
    for row in rows:
        out.append({"turn": row["turn"], "prompt_bytes": statistics.median(row["bytes"]),
                    "ttfb_off": statistics.median(row["off"]), "ttfb_on": statistics.median(row["on"]),
                    "loaded": statistics.median(row["loaded"]), "differ": row["differ"]})  # fmt: skip
        r = out[-1]
        print(f"turn {r['turn']} ({r['prompt_bytes']:.0f} B): first byte off {r['ttfb_off'] * 1e3:.1f} ms, "
              f"on {r['ttfb_on'] * 1e3:.1f} ms, {r['loaded']:.0f} ids loaded; differ {r['differ']}",
              flush=True)  # fmt: skip
    return out


def scoring(off, on) -> dict:
    """An evaluation harness's loglikelihood requests: a 1,000-byte context scored with each of
    CONTINUATIONS continuations (prompt_logprobs 1), per context; seconds per request, median over
    5 contexts, with snapshots on and off, and whether every score is the same."""
    contexts = code_snippets(5, SOURCES, (1000, 1001), seed=13, tail=4000)
    conts = code_snippets(CONTINUATIONS, SOURCES, (20, 60), seed=17, tail=4000)
    seconds: dict[str, list[float]] = {"off": [], "on": []}
    differ = 0
    for context in contexts:
        for cont in conts:
            outs = {}
            for name, g in (("off", off), ("on", on)):
                t0 = time.perf_counter()
                outs[name] = g.generate(context + cont, mode="ar", max_bytes=1, prompt_logprobs=1)
                seconds[name].append(time.perf_counter() - t0)
            differ += outs["off"].prompt_top_logprobs != outs["on"].prompt_top_logprobs
    r = {k: statistics.median(v) for k, v in seconds.items()} | {"differ": differ, "requests": len(seconds["on"])}
    print(f"scoring: off {r['off'] * 1e3:.1f} ms, on {r['on'] * 1e3:.1f} ms per request; differ {differ}", flush=True)
    return r


async def regenerate(engine, prompt: str) -> list[dict]:
    """The prompt sent AGAIN times one after another, sampled with seeds 0..: per request its time to
    the first chunk, the prompt ids it loaded, and its text."""
    out = []
    for seed in range(AGAIN):
        t0 = time.perf_counter()
        stream = engine.stream(prompt, mode="ar", max_bytes=MAX_BYTES, temperature=0.8, seed=seed, stop_on_eos=False)
        first = None
        parts = []
        async for text in stream:
            first = time.perf_counter() - t0 if first is None else first
            parts.append(text)
        out.append({"ttfb": first, "cached": stream.generation.stats.prompt_cached, "text": "".join(parts)})
    return out


def serve_like(alone) -> dict:
    from fastblt.runtime.async_engine import AsyncEngine

    prompt = code_snippets(1, SOURCES, (1000, 1001), seed=7, tail=4000)[0]
    engine = AsyncEngine("default")
    try:
        runs = asyncio.run(regenerate(engine, prompt))
        lanes = len(engine.lanes)
    finally:
        engine.close()
    want = [alone.generate(prompt, mode="ar", max_bytes=MAX_BYTES, temperature=0.8, seed=s, stop_on_eos=False).text
            for s in range(AGAIN)]  # fmt: skip
    r = {"lanes": lanes, "ttfb_first": runs[0]["ttfb"], "ttfb_again": statistics.median(x["ttfb"] for x in runs[1:])}
    r["loaded"] = sum(x["cached"] > 0 for x in runs[1:])
    r["differ"] = sum(x["text"] != w for x, w in zip(runs, want, strict=True))
    print(f"AsyncEngine ({lanes} lanes): first {r['ttfb_first'] * 1e3:.1f} ms, again {r['ttfb_again'] * 1e3:.1f} ms, "
          f"{r['loaded']} of {AGAIN - 1} loaded, differ {r['differ']}", flush=True)  # fmt: skip
    return r


async def clients(engine, order: list[str]) -> list[dict]:
    """CLIENTS tasks taking prompts from `order` until it is empty: per request its time to the first
    chunk and its text."""
    todo, out = list(order), []

    async def client() -> None:
        while todo:
            prompt, t0, first, parts = todo.pop(), time.perf_counter(), None, []
            async for text in engine.stream(prompt, mode="ar", max_bytes=CLIENT_BYTES, stop_on_eos=False):
                first = time.perf_counter() - t0 if first is None else first
                parts.append(text)
            out.append({"prompt": prompt, "ttfb": first, "text": "".join(parts)})

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return out


def shared_lanes(alone) -> list[dict]:
    """Many clients resending prompts, lanes sharing snapshots or not (alternated ROUNDS times)."""
    from fastblt.runtime.async_engine import AsyncEngine

    pool = code_snippets(POOL, SOURCES, (1000, 1001), seed=11, tail=4000)
    order = [p for p in pool for _ in range(SENDS)]
    random.Random(0).shuffle(order)
    want = {p: alone.generate(p, mode="ar", max_bytes=CLIENT_BYTES, stop_on_eos=False).text for p in pool}
    results = []
    for share in [False, True] * ROUNDS:
        engine = AsyncEngine("default", share_prompts=share)
        try:
            t0 = time.perf_counter()
            runs = asyncio.run(clients(engine, order))
            wall, stats, lanes = time.perf_counter() - t0, engine.stats, len(engine.lanes)
        finally:
            engine.close()
        ttfb = sorted(x["ttfb"] for x in runs)
        r = {"share": share, "lanes": lanes, "requests": len(runs), "possible": len(order) - POOL, "wall_s": wall,
             "hits": stats.prompt_hits, "shared_hits": stats.prompt_shared_hits,
             "shared_prefills": stats.shared_prefills, "ttfb_p50": ttfb[len(ttfb) // 2],
             "ttfb_p95": ttfb[int(0.95 * len(ttfb))],
             "differ": sum(x["text"] != want[x["prompt"]] for x in runs)}  # fmt: skip
        print(f"{CLIENTS} clients, lanes {'sharing' if share else 'alone'}: {wall:.1f} s, hits {r['hits']} "
              f"({r['shared_hits']} shared) of {r['possible']}, first byte p50 {r['ttfb_p50'] * 1e3:.0f} ms, "
              f"differ {r['differ']}", flush=True)  # fmt: skip
        results.append(r)
    return results


def render(r: dict) -> str:
    m, s = r["meta"], r["serve"]
    lines = [
        "# Prompt snapshots: a prompt sent again",
        "",
        f"`python benchmarks/prompt_cache.py` — {m['date']}, {m['machine']}, {m['cpu_count']} CPUs, onnxruntime "
        f"{m['onnxruntime']}. Generators on ort at their defaults (snapshots on: 64 MB) and one with "
        f"`prompt_cache_mb=0`, side by side per prompt; greedy `ar`, {MAX_BYTES} bytes; median of "
        f"{PER_LENGTH} stdlib code prompts per length.",
        "",
        "| prompt bytes | first byte, snapshots off ms | prompt new ms | new / off | prompt sent again ms | "
        "off / again | snapshot MB | one snapshot taken, ms | bytes differ |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        off, new, again = row["ttfb_off"], row["ttfb_new"], row["ttfb_again"]
        lines.append(f"| {row['prompt_bytes']:,} | {off * 1e3:.1f} | {new * 1e3:.1f} | {new / off:.2f} | "
                     f"{again * 1e3:.1f} | {off / again:.1f}x | {row['snapshot_mb']:.1f} | {row['save_ms']:.1f} | "
                     f"{row['differ']} of "
                     f"{PER_LENGTH} |")  # fmt: skip
    lines += [
        "",
        "First byte: the call's start to its first verified byte (the prompt's commit, then one byte). "
        "Prompt new: a call that commits its prompt in parts (split at its split points) and keeps snapshots at "
        "its two deepest (the cut and the 256-multiple below it); snapshots off commits it the same way and keeps "
        "none, so new / off is what keeping costs (two snapshots taken, each timed apart in the next column; the "
        "ratio's spread is the machine's noise). Sent again: the same prompt, loaded from the snapshot at its cut, "
        "the last chunk committed. Bytes differ: prompts whose three outputs are not identical.",
        "",
        f"**A conversation** ({CONVERSATIONS} conversations, medians): turn 1 is 600 bytes of stdlib code, "
        f"each next turn the last prompt, its {MAX_BYTES}-byte answer and 400 more bytes; each turn loads the "
        "snapshot the turn before kept at the 256-multiple below its cut, and commits from there.",
        "",
        "| turn | prompt bytes | first byte, snapshots off ms | on ms | off / on | prompt ids loaded | bytes differ |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {c['turn']} | {c['prompt_bytes']:,.0f} | {c['ttfb_off'] * 1e3:.1f} | {c['ttfb_on'] * 1e3:.1f} | "
            f"{c['ttfb_off'] / c['ttfb_on']:.1f}x | {c['loaded']:,.0f} | {c['differ']} of {CONVERSATIONS} |"
            for c in r["conversation"]
        ],
        "",
        f"**Scoring** (an evaluation harness's loglikelihood requests): 5 contexts of 1,000 bytes of stdlib "
        f"code, each scored with {CONTINUATIONS} continuations of 20-60 bytes (`prompt_logprobs` 1, one byte "
        f"out): {r['scoring']['off'] * 1e3:.1f} ms per request with snapshots off, {r['scoring']['on'] * 1e3:.1f} "
        f"ms on ({r['scoring']['off'] / r['scoring']['on']:.1f}x; medians; a context's first request commits "
        f"it and keeps its scores, the others load them at the 256-multiple below the context's end); "
        f"{r['scoring']['differ']} of {r['scoring']['requests']} requests' scores differ.",
        "",
        f"**Through an AsyncEngine** at its defaults ({s['lanes']} lane(s)): a 1,000-byte prompt sent {AGAIN} "
        f"times one after another, sampled (temperature 0.8, seeds 0..{AGAIN - 1}): first byte "
        f"{s['ttfb_first'] * 1e3:.1f} ms for the first request, {s['ttfb_again'] * 1e3:.1f} ms (median) for "
        f"the others ({s['ttfb_first'] / s['ttfb_again']:.1f}x sooner); {s['loaded']} of {AGAIN - 1} loaded "
        f"the snapshot; {s['differ']} differ from the same seeded request run alone by a Generator.",
        "",
        f"**Many clients** through the same AsyncEngine ({r['clients'][0]['lanes']} worker lanes): {CLIENTS} "
        f"clients at once send {POOL} prompts of 1,000 bytes of stdlib code {SENDS} times each, in one shuffled "
        f"order (greedy `ar`, {CLIENT_BYTES} bytes): {r['clients'][0]['possible']} "
        "requests could load a snapshot. Lanes sharing: every lane loads the snapshots any lane kept (files in "
        "/dev/shm, the default); alone: `share_prompts=False`, a lane finds only its own (the router sends a "
        "prompt back to its lane only when the lanes' loads tie). Runs alternated; each its own engine.",
        "",
        "| lanes | run | seconds | prompt snapshots loaded | from another lane | prefills shared in a batch | "
        "first byte p50 ms | p95 ms | outputs differ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {'sharing' if c['share'] else 'alone'} | {i // 2 + 1} | {c['wall_s']:.1f} | {c['hits']} of "
            f"{c['possible']} | {c['shared_hits']} | {c['shared_prefills']} | {c['ttfb_p50'] * 1e3:.0f} | "
            f"{c['ttfb_p95'] * 1e3:.0f} | {c['differ']} of {c['requests']} |"
            for i, c in enumerate(r["clients"])
        ],
        "",
        "Requests that find no snapshot commit their prompt, or copy the prefill of a request of the same prompt "
        "their lane admitted first (a shared prefill); outputs are compared with a Generator's alone, without "
        "snapshots.",
        "",
    ]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    rows = r["rows"]
    series = [
        ("snapshots off", "ttfb_off"),
        ("new prompt (keeps one)", "ttfb_new"),
        ("sent again (loads it)", "ttfb_again"),
    ]
    grouped_bars(path, [f"{row['prompt_bytes']:,} B" for row in rows],
                 [(label, [row[key] * 1e3 for row in rows]) for label, key in series],
                 "ms to the first byte", "Prompt snapshots: time to the first byte (ar, ort)")  # fmt: skip


def main() -> None:
    from fastblt.runtime.generator import Generator

    off, on = Generator("default", prompt_cache_mb=0), Generator("default")
    warm = code_snippets(1, SOURCES, (300, 301), seed=1, tail=4000)[0]
    for g in (off, on):  # sessions loaded, buffers made
        g.generate(warm[::-1], mode="ar", max_bytes=MAX_BYTES)
    r = {"meta": machine_meta(), "rows": [measure(off, on, length) for length in LENGTHS]}
    r["conversation"] = conversation(off, on)
    r["scoring"] = scoring(off, on)
    on.close()
    r["serve"] = serve_like(off)
    r["clients"] = shared_lanes(off)
    save("prompt_cache", r, render, plot)


if __name__ == "__main__":
    main()
