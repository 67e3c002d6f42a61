"""The Batch API beside live traffic on one `fastblt serve --batch-dir`: what a running batch costs
the live requests, and how fast a batch goes alone and under live load.

    python benchmarks/batch_api.py            # ~2 minutes on 2 cores
    python benchmarks/batch_api.py --ray      # the same against 2 Ray Serve replicas and the batch actor

One server at its defaults (plus `--batch-dir`, a temporary directory) on 127.0.0.1; the same
greedy `blt-s` requests of stdlib code (100-300 bytes, 256 new bytes each) in three phases:

1. live alone: 4 clients stream 32 requests, each sending its next when one ends;
2. a batch alone: 96 requests uploaded as a file, run as a batch (polled every 0.1 s);
3. both: the same batch started, then the same live load while it runs.

Live: time to first byte p50 / p95, inter-byte latency p95, aggregate bytes/s (serve_load.py's
client and measures). Batch: its bytes over the time from `create` to `completed`, and over the
part of phase 3 that overlapped the live load. Every answer, live or batched, is compared with the
same request run alone by `fastblt.Generator` (greedy, so it must be equal).

With --ray the server is `fastblt serve --ray --batch-dir DIR`'s deployment on a local cluster of
two nodes of one CPU each (a replica each; Ray's processes, the batch actor and the client share
the same two cores), where the batch actor runs the batch through the replicas.

Results: benchmarks/results/batch_api.{json,md,png}; with --ray, batch_api_ray.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx
from common import machine_meta, save
from serve_load import MAX_TOKENS, MODEL, answers_alone, code_prompts, level, summarize

MODE = "blt-s"
LIVE_CLIENTS, LIVE_REQUESTS, BATCH_REQUESTS = 4, 32, 96


def batch_file(prompts: list[str], n: int) -> bytes:
    lines = ({"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": MODEL, "prompt": prompts[i % len(prompts)], "max_tokens": MAX_TOKENS,
                       "temperature": 0, "mode": MODE}} for i in range(n))  # fmt: skip
    return "\n".join(json.dumps(x) for x in lines).encode()


async def run_batch(client: httpx.AsyncClient, url: str, data: bytes, started: asyncio.Event | None = None) -> dict:
    """Upload `data`, run it as a batch, wait for it: its wall time, bytes and answers by custom_id."""
    up = await client.post(f"{url}/v1/files", files={"file": ("b.jsonl", data)}, data={"purpose": "batch"})
    body = {"input_file_id": up.json()["id"], "endpoint": "/v1/completions", "completion_window": "24h"}
    t0 = time.perf_counter()
    batch = (await client.post(f"{url}/v1/batches", json=body)).json()
    if started is not None:
        started.set()
    while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
        await asyncio.sleep(0.1)
        batch = (await client.get(f"{url}/v1/batches/{batch['id']}")).json()
    wall = time.perf_counter() - t0
    answers, errors = {}, batch["request_counts"]["failed"]
    if batch["output_file_id"]:
        for line in (await client.get(f"{url}/v1/files/{batch['output_file_id']}/content")).text.splitlines():
            row = json.loads(line)
            answers[row["custom_id"]] = row["response"]["body"]["choices"][0]["text"]
    return {"status": batch["status"], "wall": wall, "t0": t0, "answers": answers, "errors": errors}


def batch_summary(b: dict, prompts: list[str], want: dict[str, str]) -> dict:
    out = sum(len(t.encode()) for t in b["answers"].values())
    wrong = sum(t != want[prompts[int(cid[1:]) % len(prompts)]] for cid, t in b["answers"].items())
    return {"status": b["status"], "requests": len(b["answers"]) + b["errors"], "errors": b["errors"], "wrong": wrong,
            "bytes": out, "wall_s": b["wall"], "bytes_per_s": out / b["wall"]}  # fmt: skip


async def phases(url: str, prompts: list[str], want: dict[str, str]) -> dict:
    data = batch_file(prompts, BATCH_REQUESTS)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        await level(url, prompts, MODE, LIVE_CLIENTS, LIVE_REQUESTS)  # warm: the prompts' snapshots kept
        live = summarize(await level(url, prompts, MODE, LIVE_CLIENTS, LIVE_REQUESTS), prompts, want)
        alone = batch_summary(await run_batch(client, url, data), prompts, want)
        started = asyncio.Event()
        task = asyncio.create_task(run_batch(client, url, data, started))
        await started.wait()
        t_live = time.perf_counter()
        both_live = summarize(await level(url, prompts, MODE, LIVE_CLIENTS, LIVE_REQUESTS), prompts, want)
        t_live_end = time.perf_counter()
        both = await task
    both_batch = batch_summary(both, prompts, want)
    both_batch["overlap_s"] = t_live_end - t_live
    return {"live_alone": live, "batch_alone": alone, "live_with_batch": both_live, "batch_with_live": both_batch}


def render(r: dict) -> str:
    m = r["meta"]
    la, lb, ba, bb = r["live_alone"], r["live_with_batch"], r["batch_alone"], r["batch_with_live"]
    lines = [
        "# The Batch API beside live traffic",
        "",
        f"`{m['command']}` — {m['date']}, {m['machine']}, {m['cpu_count']} CPUs shared by server and client. "
        f"Server: {m.get('server', '`fastblt serve --batch-dir DIR`')} at its defaults (max_batch "
        f"{m['max_batch']}), embedded default "
        f"checkpoint, greedy `{MODE}`, {m['max_tokens']} new bytes per request on stdlib code prompts of 100-300 "
        f"bytes. Live: {LIVE_CLIENTS} clients streaming {LIVE_REQUESTS} requests; batch: {BATCH_REQUESTS} requests.",
        "",
        "## Live requests, without and with a batch running",
        "",
        "| live load | aggregate B/s | TTFB p50 / p95 ms | inter-byte p95 ms | errors | != alone |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in (("alone", la), ("while a batch runs", lb)):
        lines.append(f"| {name} | {s['bytes_per_s']:.0f} | {s['ttfb_p50_ms']:.0f} / {s['ttfb_p95_ms']:.0f} | "
                     f"{s['gap_p95_ms']:.2f} | {s['errors']} | {s['wrong']} |")  # fmt: skip
    lines += [
        "",
        "## The batch, alone and under the live load",
        "",
        "| batch | status | requests | wall s | B/s | errors | != alone |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in (("alone", ba), ("while live requests run", bb)):
        lines.append(f"| {name} | {s['status']} | {s['requests']} | {s['wall_s']:.1f} | {s['bytes_per_s']:.0f} | "
                     f"{s['errors']} | {s['wrong']} |")  # fmt: skip
    overlap = bb["overlap_s"] / bb["wall_s"]
    lines += [
        "",
        f"Live bytes/s while the batch ran: {lb['bytes_per_s'] / la['bytes_per_s']:.2f}x its rate alone; the live "
        f"load ({bb['overlap_s']:.1f} s) overlapped {overlap:.0%} of the batch's run. Batches keep three quarters "
        "of the rows busy on an idle server, an eighth while live requests run, none while a request waits for a "
        "row (docs/serving.md, The Batch API on the server; on Ray, each replica lets the batch actor's requests "
        "go by the same rule, the actor keeping three quarters of a replica's rows in flight per replica "
        "running, and sends the rest back to be "
        "sent again 0.1 s later: docs/scale-out.md). Before the three phases the live load runs once "
        "unmeasured, so every phase finds the prompt snapshots it would in a long-running server.",
        "",
        "!= alone: answers whose text differs from the same request run alone (Generator, batch 1).",
    ]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    """Live latency (left) and each side's bytes/s (right), alone and together."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    la, lb, ba, bb = r["live_alone"], r["live_with_batch"], r["batch_alone"], r["batch_with_live"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, groups, alone, together, ylabel in (
        (left, ["TTFB p50", "TTFB p95"], [la["ttfb_p50_ms"], la["ttfb_p95_ms"]],
         [lb["ttfb_p50_ms"], lb["ttfb_p95_ms"]], "live requests, ms"),
        (right, ["live", "batch"], [la["bytes_per_s"], ba["bytes_per_s"]], [lb["bytes_per_s"], bb["bytes_per_s"]],
         "bytes/s"),
    ):  # fmt: skip
        x = range(len(groups))
        ax.bar([i - 0.2 for i in x], alone, 0.4, label="alone")
        ax.bar([i + 0.2 for i in x], together, 0.4, label="both at once")
        ax.set_xticks(list(x), groups)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"The Batch API beside live traffic ({r['meta'].get('layout', 'one server')}, 2 cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ray", action="store_true", help="2 Ray Serve replicas and the batch actor, not one server")
    args = ap.parse_args()
    prompts = code_prompts(32)
    want = answers_alone(prompts, (MODE,))[MODE]
    r = {"meta": {"command": "python benchmarks/batch_api.py" + (" --ray" if args.ray else ""), **machine_meta(),
                  "max_batch": 16, "max_tokens": MAX_TOKENS}}  # fmt: skip
    with tempfile.TemporaryDirectory() as root, _server(root, args.ray) as srv:
        r |= asyncio.run(phases(srv.url, prompts, want))
    if args.ray:
        r["meta"] |= {
            "layout": "2 Ray Serve replicas",
            "startup_s": srv.startup_seconds,
            "server": "`fastblt serve --ray --replicas 2 --batch-dir DIR` (a node of one CPU per replica)",
        }
        save("batch_api_ray", r, render, plot)
    else:
        save("batch_api", r, render, plot)


def _server(root: str, ray: bool):
    if not ray:
        from fastblt.serve.process import ServerProcess

        return ServerProcess(["--batch-dir", root, "--max-queue", "512"])
    from fastblt.serve.ray_serve import DeploymentOptions, RayServer, ServerOptions

    return RayServer(ServerOptions(max_queue=512, batch_dir=root), DeploymentOptions(replicas=2), nodes=2,
                     cpus_per_node=1)  # fmt: skip


if __name__ == "__main__":
    main()
