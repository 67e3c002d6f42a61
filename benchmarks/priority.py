"""Request priorities under a full server: what a request of priority 0 waits for when every row
and a queue are held by others, with those others at the same priority and at a lower one.

    python benchmarks/priority.py            # ~2 minutes on 2 cores

One server at its defaults (16 rows) on 127.0.0.1. Background: 32 clients stream greedy `blt-s`
requests of stdlib code (256 new bytes each), each sending its next when one ends, so every row is
busy and about 16 requests wait. Probes: one client sends PROBES of the same kind of request one
after another, priority 0, after 3 s of background load. Two phases side by side:

1. background at priority 0 (everyone equal: a probe queues behind the waiting requests, first
   come, first served);
2. background at priority 2 (a probe goes ahead of them and takes a row from a running one at the
   end of its round; that one resumes later: docs/serving.md, Priorities).

Per phase: the probes' time to first byte and whole-request time (p50 / p95), the background's
aggregate bytes/s, preemptions (/metrics fastblt_preempted_total), errors, and every answer
(probes and background) compared with the same request run alone by `fastblt.Generator`.

Results: benchmarks/results/priority.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from pathlib import Path

import httpx
import numpy as np
from common import machine_meta, save
from serve_load import MAX_TOKENS, answers_alone, code_prompts, one

MODE = "blt-s"
BACKGROUND, PROBES, WARM_S = 32, 8, 3.0


async def background(client: httpx.AsyncClient, url: str, prompts: list[str], priority: int,
                     stop: asyncio.Event) -> list[tuple[str, dict]]:  # fmt: skip
    """BACKGROUND clients streaming requests until `stop`: (prompt, result) of each."""
    done: list[tuple[str, dict]] = []

    async def loop(k: int) -> None:
        i = k
        while not stop.is_set():
            prompt = prompts[i % len(prompts)]
            done.append((prompt, await one(client, url, prompt, MODE, {"priority": priority})))
            i += BACKGROUND

    await asyncio.gather(*[loop(k) for k in range(BACKGROUND)])
    return done


def preempted(url: str) -> float:
    m = re.search(r"^fastblt_preempted_total (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
    return float(m[1]) if m else 0.0


async def phase(url: str, prompts: list[str], want: dict[str, str], priority: int) -> dict:
    before = preempted(url)
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=BACKGROUND + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        load = asyncio.create_task(background(client, url, prompts, priority, stop))
        t0 = time.perf_counter()
        await asyncio.sleep(WARM_S)
        probes = []
        for i in range(PROBES):
            prompt = prompts[(7 * i + 3) % len(prompts)]
            start = time.perf_counter()
            result = await one(client, url, prompt, MODE, {"priority": 0})
            probes.append((prompt, result | {"seconds": time.perf_counter() - start}))
        stop.set()
        done = await load
        wall = time.perf_counter() - t0
    ok = [(p, r) for p, r in probes if "error" not in r]
    ttfb = np.array([r["ttfb"] for _, r in ok] or [0.0])
    whole = np.array([r["seconds"] for _, r in ok] or [0.0])
    bg_ok = [(p, r) for p, r in done if "error" not in r]
    return {
        "background_priority": priority,
        "probes": len(probes),
        "probe_ttfb_p50_ms": 1e3 * float(np.percentile(ttfb, 50)),
        "probe_ttfb_p95_ms": 1e3 * float(np.percentile(ttfb, 95)),
        "probe_s_p50": float(np.percentile(whole, 50)),
        "probe_s_p95": float(np.percentile(whole, 95)),
        "background_requests": len(done),
        "background_bytes_per_s": sum(len(r["text"].encode()) for _, r in bg_ok) / wall,
        "preemptions": preempted(url) - before,
        "errors": len(probes) - len(ok) + len(done) - len(bg_ok),
        "wrong": sum(r["text"] != want[p] for p, r in ok + bg_ok),
    }


def render(r: dict) -> str:
    m = r["meta"]
    lines = [
        "# Request priorities under a full server",
        "",
        f"`{m['command']}` — {m['date']}, {m['machine']}, {m['cpu_count']} CPUs shared by server and clients. "
        f"Server: `fastblt serve` at its defaults (max_batch 16), embedded default checkpoint, greedy `{MODE}`, "
        f"{m['max_tokens']} new bytes per request on stdlib code prompts. Background: {BACKGROUND} streaming "
        f"clients (every row busy, ~16 requests waiting); probes: {PROBES} requests of priority 0, one at a time.",
        "",
        "| background priority | probe TTFB p50 / p95 ms | probe whole s p50 / p95 | background B/s | "
        "preemptions | errors | != alone |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in r["phases"]:
        lines.append(f"| {p['background_priority']} | {p['probe_ttfb_p50_ms']:.0f} / {p['probe_ttfb_p95_ms']:.0f} | "
                     f"{p['probe_s_p50']:.2f} / {p['probe_s_p95']:.2f} | {p['background_bytes_per_s']:.0f} | "
                     f"{p['preemptions']:.0f} | {p['errors']} | {p['wrong']} |")  # fmt: skip
    same, low = r["phases"]
    lines += [
        "",
        f"A probe's first byte came {same['probe_ttfb_p50_ms'] / max(low['probe_ttfb_p50_ms'], 1e-9):.0f}x "
        "sooner (p50) when the background ran at a lower priority: it went ahead of the waiting requests and took a "
        "row at the end of a running one's round instead of waiting for rows to free. The background's bytes/s "
        f"went from {same['background_bytes_per_s']:.0f} to {low['background_bytes_per_s']:.0f}: a preempted "
        "request resumes where it stopped, so nothing is computed twice (its ring row is copied aside and back).",
        "",
        "!= alone: answers (probes and background) whose text differs from the same request run alone "
        "(Generator, batch 1); greedy, so it must be 0.",
    ]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    """The probes' time to first byte, p50 and p95, with the background at each priority."""
    from common import grouped_bars

    same, low = r["phases"]
    grouped_bars(path, ["TTFB p50", "TTFB p95"],
                 [("background priority 0 (equal)", [same["probe_ttfb_p50_ms"], same["probe_ttfb_p95_ms"]]),
                  ("background priority 2 (lower)", [low["probe_ttfb_p50_ms"], low["probe_ttfb_p95_ms"]])],
                 "probe requests, ms", "A priority-0 request on a full server (2 cores)")  # fmt: skip


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    from fastblt.serve.process import ServerProcess

    prompts = code_prompts(32)
    want = answers_alone(prompts, (MODE,))[MODE]
    with ServerProcess(["--max-queue", "512"]) as srv:
        r = {"meta": {"command": "python benchmarks/priority.py", **machine_meta(), "max_batch": 16,
                      "max_tokens": MAX_TOKENS}}  # fmt: skip
        r["phases"] = [asyncio.run(phase(srv.url, prompts, want, priority)) for priority in (0, 2)]
    save("priority", r, render, plot)


if __name__ == "__main__":
    main()
