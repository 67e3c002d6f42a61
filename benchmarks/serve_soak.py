"""A long mixed load on one `fastblt serve`: does its memory level off, does it stay correct, and
does it end with every slot free?

    python benchmarks/serve_soak.py                   # 2,000 requests, ~10 minutes on 2 cores
    python benchmarks/serve_soak.py --requests 400    # a shorter run

16 clients send requests one after another, drawn with a fixed seed: every mode, greedy or sampled
with a seed, 8 to 160 new bytes, stop strings, prompts of 20 to 600 bytes; a fifth of them
streamed, and a third of those dropped by the client after a few events; one in twelve malformed
(must get a 4xx). Every 100 requests the server's memory is read (the proportional set size summed
over its process group: the server, its lane processes and their zygote). Greedy and seeded responses that ran to the
end are compared with the same request run alone by `fastblt.Generator`. At the end `/metrics`
must show no request decoding or queued. The server runs at its defaults in its own process
group on 127.0.0.1. Then three servers, one after another, take the first 200 requests with their
lanes laid out three ways (worker processes forked from a zygote, the default; fresh
interpreters; threads): their memory at rest and after.

Results: benchmarks/results/serve_soak.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx
import numpy as np
from common import code_snippets, machine_meta, save, targets_table

MODEL = "fastblt-default"
MODES = ("ar", "blt-s", "blt-d", "blt-dv")
CLIENTS = 16
SAMPLE_EVERY = 100
SOURCES = ("json/decoder.py", "email/message.py", "textwrap.py", "argparse.py", "string.py", "shlex.py")
BAD = (
    b"{not json",
    json.dumps({"model": MODEL, "prompt": 5}).encode(),
    json.dumps({"model": MODEL, "prompt": "x", "max_tokens": -3}).encode(),
    json.dumps({"model": MODEL, "prompt": "x", "mode": "fast"}).encode(),
    json.dumps({"model": MODEL, "prompt": "x", "n": 17}).encode(),
    b'{"model": "fastblt-default", "prompt": "\xff\xfe"}',
)
GROWTH_BOUND_MB = 50.0  # memory from the first sample (after 100 requests) to the highest
# A leak keeps growing once the working set is in place; warming up does not. The highest sample
# of the last third against the highest of the middle third sees the first and not the second,
# where growth from request 100 reads a late warm-up as a leak (and a low first sample as growth).
DRIFT_BOUND_MB = 10.0  # ~15 KB a request over the last third of 2,000


def draw_requests(n: int, seed: int) -> list[dict]:
    """The load: n request descriptions, the same for every run with the same seed."""
    rng = np.random.default_rng(seed)
    prompts = code_snippets(64, SOURCES, (20, 600), seed=seed, tail=2000)
    out = []
    for i in range(n):
        if rng.random() < 1 / 12:
            out.append({"i": i, "bad": BAD[int(rng.integers(len(BAD)))].decode("latin-1")})
            continue
        body = {
            "model": MODEL,
            "prompt": prompts[int(rng.integers(len(prompts)))],
            "max_tokens": int(rng.integers(8, 161)),
            "mode": MODES[int(rng.integers(len(MODES)))],
            "temperature": 0.0 if rng.random() < 0.6 else 0.8,
        }
        if body["temperature"]:
            body["seed"] = int(rng.integers(1 << 30))
        if rng.random() < 0.2:
            body["stop"] = ["\n\n"]
        stream = bool(rng.random() < 0.2)
        drop_after = int(rng.integers(1, 4)) if stream and rng.random() < 1 / 3 else None
        out.append({"i": i, "body": body, "stream": stream, "drop_after": drop_after})
    return out


async def send(client: httpx.AsyncClient, url: str, job: dict) -> dict:
    """One request -> {"status", "text"?, "dropped"?, "error"?}."""
    try:
        if "bad" in job:
            headers = {"content-type": "application/json"}
            r = await client.post(url, content=job["bad"].encode("latin-1"), headers=headers)
            return {"status": r.status_code}
        body = job["body"] | {"stream": job["stream"]}
        if not job["stream"]:
            r = await client.post(url, json=body)
            return {"status": r.status_code, "text": r.json()["choices"][0]["text"] if r.status_code == 200 else None}
        text, events = [], 0
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return {"status": r.status_code}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                text.append(json.loads(line[6:])["choices"][0]["text"])
                events += 1
                if job["drop_after"] is not None and events >= job["drop_after"]:
                    return {"status": 200, "dropped": True}  # leaving the block closes the connection
        return {"status": 200, "text": "".join(text)}
    except httpx.HTTPError as e:
        return {"status": 0, "error": f"{type(e).__name__}: {e}"}


def pss_mb(srv) -> float:
    """Memory of the server's process group: the proportional set size summed over the server, its
    lane workers and their zygote (pages the forked workers share count once, split among them;
    resident sizes would count them once per worker)."""
    total = 0
    for pid in srv.group():
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:  # ended meanwhile
            continue
        total += next((int(line.split()[1]) for line in rollup if line.startswith("Pss:")), 0)
    if total == 0:
        raise RuntimeError(f"no memory read for process group {srv.proc.pid}")
    return total / 1024


async def soak(srv, jobs: list[dict]) -> dict:
    base = srv.url
    queue = list(jobs)
    results: dict[int, dict] = {}
    samples: list[tuple[int, float, float]] = []  # requests done, seconds, PSS MB
    t0 = time.perf_counter()

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            job = queue.pop(0)
            results[job["i"]] = await send(client, f"{base}/v1/completions", job)
            done = len(results)
            if done % SAMPLE_EVERY == 0:
                samples.append((done, time.perf_counter() - t0, pss_mb(srv)))
                print(f"{done} requests, {samples[-1][1]:.0f} s, server PSS {samples[-1][2]:.0f} MB", flush=True)

    limits = httpx.Limits(max_connections=CLIENTS + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        await asyncio.gather(*[client_loop(client) for _ in range(CLIENTS)])
        wall = time.perf_counter() - t0
        idle = await settled(client, base)
    return {"results": results, "samples": samples, "wall_s": wall, "idle": idle}


async def settled(client: httpx.AsyncClient, base: str, timeout: float = 10.0) -> dict:
    """Occupancy and queue depth from /metrics once they reach 0 (or after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        text = (await client.get(f"{base}/metrics")).text
        values = {
            name: float(line.split()[-1])
            for line in text.splitlines()
            for name in ("fastblt_batch_occupancy", "fastblt_queue_depth")
            if line.startswith(name + " ")
        }
        if not any(values.values()) or time.monotonic() > deadline:
            return values
        await asyncio.sleep(0.2)


LAYOUTS = (  # the server's lanes, laid out three ways (its defaults otherwise)
    ("worker processes forked from a zygote (the default)", [], {}),
    ("worker processes, each a fresh interpreter (FASTBLT_ZYGOTE=0)", [], {"FASTBLT_ZYGOTE": "0"}),
    ("threads of the server (--lane-threads)", ["--lane-threads"], {}),
)
LAYOUT_REQUESTS = 200


def memory_of(name: str, args: list[str], env: dict[str, str], jobs: list[dict]) -> dict:
    """A server's memory with its lanes laid out one way: at rest, then after the first jobs."""
    from fastblt.serve.process import ServerProcess

    with ServerProcess(args, env=env) as srv:
        processes, rest = len(srv.group()), pss_mb(srv)
        run = asyncio.run(soak(srv, jobs))
        after = pss_mb(srv)
    print(f"{name}: {rest:.0f} MB at rest, {after:.0f} MB after {len(jobs)} requests", flush=True)
    return {"layout": name, "processes": processes, "rest_mb": rest, "after_mb": after, "wall_s": run["wall_s"]}


def check(jobs: list[dict], results: dict[int, dict]) -> dict:
    """Compare finished greedy/seeded responses with Generator alone; count statuses."""
    from fastblt.runtime.generator import Generator

    g = Generator("default")
    counts = {"ok": 0, "dropped": 0, "bad_4xx": 0, "bad_not_4xx": 0, "errors": 0, "compared": 0, "wrong": 0}
    for job in jobs:
        r = results[job["i"]]
        if "bad" in job:
            counts["bad_4xx" if 400 <= r["status"] < 500 else "bad_not_4xx"] += 1
        elif r["status"] != 200:
            counts["errors"] += 1
        elif r.get("dropped"):
            counts["dropped"] += 1
        else:
            counts["ok"] += 1
            b = job["body"]
            options = {k: b[k] for k in ("mode", "temperature", "seed", "stop") if k in b}
            want = g.generate(b["prompt"], max_bytes=b["max_tokens"], **options).text
            counts["compared"] += 1
            counts["wrong"] += r["text"] != want
    g.close()
    return counts


def targets(r: dict) -> list[dict]:
    c, s = r["counts"], r["samples"]
    growth = max(mb for _, _, mb in s) - s[0][2]  # to the highest sample: a batch that runs empty lets go of memory
    third = len(s) // 3
    drift = max(mb for *_, mb in s[2 * third :]) - max(mb for *_, mb in s[third : 2 * third])
    rows = [
        ("responses != the request alone", c["wrong"], "== 0", c["wrong"] == 0),
        ("server errors and failed connections", c["errors"], "== 0", c["errors"] == 0),
        ("malformed requests not answered 4xx", c["bad_not_4xx"], "== 0", c["bad_not_4xx"] == 0),
        ("requests decoding or queued at the end", sum(r["idle"].values()), "== 0", not any(r["idle"].values())),
        (f"server memory (PSS) growth, request {s[0][0]} to the highest of {len(s)} samples (MB)", growth,
         f"<= {GROWTH_BOUND_MB:g}",
         growth <= GROWTH_BOUND_MB),
        ("server memory (PSS) drift: highest of the last third of samples minus highest of the middle "
         "third (MB)", drift, f"<= {DRIFT_BOUND_MB:g}", drift <= DRIFT_BOUND_MB),
    ]  # fmt: skip
    return [{"target": t, "value": float(v), "bound": b, "met": bool(m)} for t, v, b, m in rows]


def render(r: dict) -> str:
    m, c = r["meta"], r["counts"]
    lines = [
        "# Serving soak: a long mixed load on `fastblt serve`",
        "",
        f"`{m['command']}` — {m['date']}, {m['machine']}, {m['cpu_count']} CPUs shared by server and client, "
        f"onnxruntime {m['onnxruntime']}. Server at its defaults; {CLIENTS} clients, {m['requests']} requests "
        f"in {r['wall_s']:.0f} s: every mode, greedy and seeded sampling, 8-160 bytes, a fifth streamed (a "
        "third of those dropped mid-stream), one in twelve malformed.",
        "",
        "## Targets",
        "",
        *targets_table(r["targets"]),
        "",
        "## Requests",
        "",
        "| finished | compared with Generator | dropped mid-stream | malformed -> 4xx | errors |",
        "|---:|---:|---:|---:|---:|",
        f"| {c['ok']} | {c['compared']} | {c['dropped']} | {c['bad_4xx']} | {c['errors']} |",
        "",
        f"## Memory by lane layout (the first {LAYOUT_REQUESTS} requests, one server after another)",
        "",
        "| lanes | processes | PSS MB at rest | after the requests | seconds |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {x['layout']} | {x['processes']} | {x['rest_mb']:.0f} | {x['after_mb']:.0f} | {x['wall_s']:.0f} |"
            for x in r.get("layouts", [])
        ),
        "",
        "## Server memory (proportional set size over its process group)",
        "",
        "| requests | seconds | PSS MB |",
        "|---:|---:|---:|",
        *(f"| {n} | {t:.0f} | {mb:.0f} |" for n, t, mb in r["samples"]),
        "",
    ]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, _, mb = zip(*r["samples"], strict=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(n, mb, marker="o")
    ax.set_xlabel("requests served")
    ax.set_ylabel("server PSS (MB)")
    ax.set_ylim(0, max(mb) * 1.15)
    ax.set_title("fastblt serve under a mixed load: memory")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="requests in all (default 2,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--render", type=Path, default=None, metavar="JSON",
                    help="re-render a saved result, its targets recomputed from its samples")  # fmt: skip
    args = ap.parse_args()
    if args.render is not None:
        r = json.loads(args.render.read_text())
        r["targets"] = targets(r)
        save(args.render.stem, r, render, plot)
        return
    if args.requests < 2 * SAMPLE_EVERY:
        ap.error(f"--requests: at least {2 * SAMPLE_EVERY}, to read memory twice")
    from fastblt.serve.process import ServerProcess

    jobs = draw_requests(args.requests, args.seed)
    command = "python benchmarks/serve_soak.py" + (f" --requests {args.requests}" if args.requests != 2000 else "")
    r: dict = {"meta": machine_meta() | {"command": command, "requests": args.requests}}
    with ServerProcess() as srv:
        run = asyncio.run(soak(srv, jobs))
    r |= {"samples": run["samples"], "wall_s": run["wall_s"], "idle": run["idle"]}
    r["layouts"] = [memory_of(name, args_, env, jobs[:LAYOUT_REQUESTS]) for name, args_, env in LAYOUTS]
    r["counts"] = check(jobs, run["results"])
    r["targets"] = targets(r)
    save("serve_soak" if args.requests == 2000 else "serve_soak_short", r, render, plot)


if __name__ == "__main__":
    main()
