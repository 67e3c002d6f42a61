"""A long mixed load on one `fastblt serve`: does its memory level off, does it stay correct, and
does it end with every slot free?

    python benchmarks/serve_soak.py                   # 2,000 requests, ~10 minutes on 2 cores
    python benchmarks/serve_soak.py --requests 400    # a shorter run (serve_soak_400)

16 clients send requests one after another, drawn with a fixed seed: every mode, greedy or sampled
with a seed, 8 to 160 new bytes, stop strings, prompts of 20 to 600 bytes, some with n 2-3
choices, a list of two prompts, logprobs, echo (or only scoring the prompt), a logit bias and
penalties, JSON mode and a JSON schema, chat completions (a tenth, through a transcript chat
template; two in five of them with tools: calls required, of a named function, left to the
model, or none); a fifth of them
streamed, and a third of those dropped by the client after a few events; one in twelve malformed
(must get a 4xx). Every 50 requests the server's memory is read: the proportional set size summed
over its process group (the server, its lane processes and their zygote), and the anonymous part
of it (heap: what a leak grows; file pages shared with other processes move with what else runs)
for the server and for the workers, and what the lanes' prompt snapshots hold (/metrics): they
fill up to their budget by design, so the trends are read net of them. The lanes keep their
snapshots as files in /dev/shm (prompt_share.py), counted once at their size in place of the
shared-memory pages the processes map. Greedy and seeded choices
that ran to the end are compared with the same request run alone by `fastblt.Generator`. At the
end `/metrics` must show no request decoding or queued. The server runs at its defaults in its
own process group on 127.0.0.1. Then three servers, one after another, take the first 200 requests with their
lanes laid out three ways (worker processes forked from a zygote, the default; fresh
interpreters; threads): their memory at rest and after.

Results: benchmarks/results/serve_soak.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from common import code_snippets, machine_meta, save, targets_table

from fastblt.runtime.prompt_cache import DEFAULT_MB
from fastblt.runtime.prompt_share import DIR_PREFIX, SHARED_MEMORY

MODEL = "fastblt-default"
MODES = ("ar", "blt-s", "blt-d", "blt-dv")
CLIENTS = 16
SOURCES = ("json/decoder.py", "email/message.py", "textwrap.py", "argparse.py", "string.py", "shlex.py")
BAD = (
    b"{not json",
    json.dumps({"model": MODEL, "prompt": 5}).encode(),
    json.dumps({"model": MODEL, "prompt": "x", "max_tokens": -3}).encode(),
    json.dumps({"model": MODEL, "prompt": "x", "mode": "fast"}).encode(),
    json.dumps({"model": MODEL, "prompt": "x", "n": 17}).encode(),
    b'{"model": "fastblt-default", "prompt": "\xff\xfe"}',
)
CHAT_TEMPLATE = """\
{% for m in messages %}
{% if m.role == 'system' %}# {{ m.content }}
{% elif m.role == 'user' %}>>> {{ m.content }}
{% else %}{{ m.content }}
{% endif %}
{% endfor %}
"""  # the embedded default's turns as a session transcript (docs/serving.md)
JSON_FORMATS = (
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "record", "schema": {
        "type": "object", "additionalProperties": False, "required": ["name", "size", "tags"],
        "properties": {"name": {"type": "string"}, "size": {"type": ["integer", "null"]},
                       "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}}}}}},
    {"type": "json_schema", "json_schema": {"name": "event", "schema": {  # keywords alone and together, recursion
        "type": "object", "additionalProperties": False,
        "required": ["when", "count", "score", "id", "code", "name", "kids"],
        "properties": {"when": {"type": "string", "format": "date-time", "pattern": "^20"},
                       "count": {"type": "integer", "minimum": 0, "maximum": 99, "multipleOf": 3},
                       "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1.5, "multipleOf": 0.25},
                       "id": {"type": "string", "format": "uuid"},
                       "code": {"type": "string", "pattern": "^[A-Z]+$", "maxLength": 4},
                       "name": {"type": "string", "minLength": 1, "maxLength": 12},
                       "kids": {"type": "array", "maxItems": 2, "items": {"$ref": "#"}}}}}},
)  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "read_file", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["path", "lines"],
        "properties": {"path": {"type": "string"}, "lines": {"type": ["integer", "null"]}}}}},
]  # fmt: skip
TOOL_CHOICES = ("required", {"type": "function", "function": {"name": "read_file"}}, "auto", "none")
CALL_TAGS = ["--tool-call-start", "<tool_call>", "--tool-call-end", "</tool_call>"]  # what "auto" reads calls by
SAMPLE_EVERY = 50
GROWTH_FROM = 100  # requests: the batches have filled once by then (the first samples are warm-up)
GROWTH_BOUND_MB = 50.0  # memory from the sample at GROWTH_FROM requests to the highest
# A leak keeps growing once the working set is in place; warming up does not. The server's heap is
# flat once warm (a Python-object count and tracemalloc over 4,000 requests did not move): a line
# fitted through its second half must stay within 2 MB per 1,000 requests (2 KB a request). The
# workers' heaps swing by +-10 MB between samples as onnxruntime's arena and malloc follow the
# batch's shapes, so they are held by their floor: the lowest sample of the last third against the
# lowest of the middle third (a leak lifts the floor; a swing only the peaks).
SERVER_SLOPE_BOUND = 2.0  # MB per 1,000 requests
WORKER_DRIFT_BOUND_MB = 10.0


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
        more = rng.random()
        if more < 0.1:
            body["n"] = int(rng.integers(2, 4))
        elif more < 0.15:
            body["prompt"] = [body["prompt"], prompts[int(rng.integers(len(prompts)))]]
        if body["mode"] != "blt-d" and rng.random() < 0.15:
            body["logprobs"] = int(rng.integers(0, 4))
        if rng.random() < 0.1:  # steered: a logit bias and OpenAI's penalties
            body["logit_bias"] = {str(int(b)): float(rng.choice([-100.0, 3.0])) for b in rng.integers(0, 256, 4)}
            body["frequency_penalty"], body["presence_penalty"] = 0.5, float(rng.choice([0.0, 0.8]))
        if rng.random() < 0.08:
            body["echo"] = True
            if not stream and rng.random() < 0.5:
                body |= {"max_tokens": 0, "logprobs": 1}  # only score the prompt
        if body["mode"] != "blt-d" and body["max_tokens"] and rng.random() < 0.08:  # JSON mode, or a schema
            body["response_format"] = JSON_FORMATS[int(rng.integers(len(JSON_FORMATS)))]
        if rng.random() < 0.1 and isinstance(body["prompt"], str) and not body.get("echo"):  # the chat API
            prompt = body.pop("prompt")
            body["messages"] = [{"role": "system", "content": "python"}, {"role": "user", "content": prompt}]
            if "logprobs" in body:
                body |= {"logprobs": True, "top_logprobs": body["logprobs"]}
            if body["mode"] != "blt-d" and "response_format" not in body and rng.random() < 0.4:  # tool calls
                body |= {"tools": TOOLS, "tool_choice": TOOL_CHOICES[int(rng.integers(len(TOOL_CHOICES)))]}
        drop_after = int(rng.integers(1, 4)) if stream and rng.random() < 1 / 3 else None
        out.append({"i": i, "body": body, "stream": stream, "drop_after": drop_after})
    return out


SAME_OPTIONS = ("mode", "temperature", "stop", "presence_penalty", "frequency_penalty")  # the Generator's names


async def send(client: httpx.AsyncClient, base: str, job: dict) -> dict:
    """One request -> {"status", "text"?, "dropped"?, "error"?}."""
    chat = "messages" in job.get("body", {})
    url = f"{base}/v1/chat/completions" if chat else f"{base}/v1/completions"
    try:
        if "bad" in job:
            headers = {"content-type": "application/json"}
            r = await client.post(url, content=job["bad"].encode("latin-1"), headers=headers)
            return {"status": r.status_code}
        body = job["body"] | {"stream": job["stream"]}
        if not job["stream"]:
            r = await client.post(url, json=body)
            if r.status_code != 200:
                return {"status": r.status_code}
            choices = sorted(r.json()["choices"], key=lambda c: c["index"])
            if not chat:
                return {"status": 200, "texts": [c["text"] for c in choices]}
            return {"status": 200, "texts": [answer(c["message"]) for c in choices]}
        texts: dict[int, str] = {}
        calls: dict[int, list] = {}
        events = 0
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return {"status": r.status_code}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for c in json.loads(line[6:])["choices"]:
                    text = (c["delta"].get("content") or "") if chat else c["text"]
                    texts[c["index"]] = texts.get(c["index"], "") + text
                    gathered(calls.setdefault(c["index"], []), c["delta"].get("tool_calls") or [] if chat else [])
                events += 1
                if job["drop_after"] is not None and events >= job["drop_after"]:
                    return {"status": 200, "dropped": True}  # leaving the block closes the connection
        if chat:  # a streamed choice's content comes in pieces, its calls' arguments too
            return {"status": 200, "texts": [answer({"content": texts[i] or None, "tool_calls": calls[i]})
                                             for i in sorted(texts)]}  # fmt: skip
        return {"status": 200, "texts": [texts[i] for i in sorted(texts)]}
    except httpx.HTTPError as e:
        return {"status": 0, "error": f"{type(e).__name__}: {e}"}


def gathered(calls: list[dict], entries: list[dict]) -> None:
    """A stream's `tool_calls` entries into `calls`, as a client puts them together: a call's first
    entry has its name, later ones more of its arguments."""
    for t in entries:
        if t["index"] == len(calls):
            calls.append({"function": dict(t["function"])})
        else:
            calls[t["index"]]["function"]["arguments"] += t["function"]["arguments"]


def answer(message: dict) -> str:
    """A chat answer as one text to compare: its content, or its calls' names and arguments."""
    calls = [[t["function"]["name"], t["function"]["arguments"]] for t in message.get("tool_calls") or []]
    return json.dumps([message.get("content") or "", calls]) if calls else message.get("content") or ""


def memory(srv) -> dict[str, float]:
    """MB of the server's process group: the proportional set size summed over the server, its lane
    workers and their zygote (pages the forked workers share count once, split among them; resident
    sizes would count them once per worker) without shared-memory pages, plus the lanes' snapshot
    files in /dev/shm (`files`, all of them, mapped or not); and the anonymous part of it (heap and
    the like, not file pages) of the server and of the workers."""
    out = {"total": 0.0, "server_anon": 0.0, "workers_anon": 0.0}
    for pid in srv.group():
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:  # ended meanwhile
            continue
        kb = {line.split(":")[0]: int(line.split()[1]) for line in rollup if line.startswith("Pss")}
        out["total"] += (kb.get("Pss", 0) - kb.get("Pss_Shmem", 0)) / 1024
        out["server_anon" if pid == srv.proc.pid else "workers_anon"] += kb.get("Pss_Anon", 0) / 1024
    if out["total"] == 0:
        raise RuntimeError(f"no memory read for process group {srv.proc.pid}")
    out["files"] = snapshot_files_mb(srv.proc.pid)
    out["total"] += out["files"]
    return out


def snapshot_dirs(pid: int) -> list[Path]:
    """The prompt snapshot directories of the engine in process `pid` (prompt_share.py)."""
    return [d for d in SHARED_MEMORY.glob(f"{DIR_PREFIX}*-{pid}-*") if d.name.split("-")[-2] == str(pid)]


def snapshot_files_mb(pid: int) -> float:
    total = 0
    for d in snapshot_dirs(pid):
        for f in d.iterdir():
            with contextlib.suppress(OSError):
                total += f.stat().st_blocks * 512
    return total / 2**20


def snapshot_mb(srv) -> float:
    """MB the lanes' prompt snapshots hold now (the server's /metrics)."""
    text = httpx.get(f"{srv.url}/metrics", timeout=30).text
    line = next(x for x in text.splitlines() if x.startswith("fastblt_prompt_cache_bytes "))
    return float(line.split()[-1]) / 2**20


async def soak(srv, jobs: list[dict]) -> dict:
    base = srv.url
    queue = list(jobs)
    results: dict[int, dict] = {}
    samples: list[tuple] = []  # requests, seconds, MB: total, server, workers, prompt snapshots, their files
    t0 = time.perf_counter()

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            job = queue.pop(0)
            results[job["i"]] = await send(client, base, job)
            done = len(results)
            if done % SAMPLE_EVERY == 0:
                mb = memory(srv)
                snap = snapshot_mb(srv)
                samples.append((done, time.perf_counter() - t0, mb["total"], mb["server_anon"], mb["workers_anon"],
                                snap, mb["files"]))  # fmt: skip
                print(f"{done} requests, {samples[-1][1]:.0f} s, PSS {mb['total']:.0f} MB (anonymous: server "
                      f"{mb['server_anon']:.0f}, workers {mb['workers_anon']:.0f}; prompt snapshots {snap:.0f})",
                      flush=True)  # fmt: skip

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
        processes, rest = len(srv.group()), memory(srv)["total"]
        run = asyncio.run(soak(srv, jobs))
        after = memory(srv)["total"]
    print(f"{name}: {rest:.0f} MB at rest, {after:.0f} MB after {len(jobs)} requests", flush=True)
    return {"layout": name, "processes": processes, "rest_mb": rest, "after_mb": after, "wall_s": run["wall_s"]}


def check(jobs: list[dict], results: dict[int, dict]) -> dict:
    """Compare finished greedy/seeded responses with Generator alone; count statuses."""
    from fastblt.runtime.generator import Generator
    from fastblt.serve.chat import ChatTemplate, parse_chat_body
    from fastblt.serve.tools import CallReader, CallTags, read_tagged

    tags = CallTags(CALL_TAGS[1], CALL_TAGS[3])
    g, template = Generator("default"), ChatTemplate(CHAT_TEMPLATE, tags=tags)
    counts = {"ok": 0, "dropped": 0, "bad_4xx": 0, "bad_not_4xx": 0, "errors": 0, "compared": 0, "wrong": 0,
              "chat": 0}  # fmt: skip
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
            prompts = [template.render(b["messages"], b.get("tools"))] if "messages" in b else b["prompt"]
            asked = {}  # what tool calls ask of the answer, as the server's parser states it
            if "tools" in b:
                asked = parse_chat_body(json.dumps(b).encode(), MODEL, "blt-s", template).options
                asked = {x: asked[x] for x in ("format", "schema", "calls") if x in asked}
            prompts = prompts if isinstance(prompts, list) else [prompts]
            n = b.get("n", 1)
            counts["wrong"] += len(r["texts"]) != len(prompts) * n
            for k, text in enumerate(r["texts"]):  # choice k: prompt k // n, seed + k % n
                prompt, options = prompts[k // n], {x: b[x] for x in SAME_OPTIONS if x in b}
                if "logit_bias" in b:
                    options["logit_bias"] = {int(byte): bias for byte, bias in b["logit_bias"].items()}
                if "response_format" in b:
                    options["format"] = "json"
                    options["schema"] = b["response_format"].get("json_schema", {}).get("schema")
                if "seed" in b:
                    options["seed"] = (b["seed"] + k % n) % 2**63
                want = "" if b["max_tokens"] == 0 else g.generate(prompt, max_bytes=b["max_tokens"], **options,
                                                                   **asked).text  # fmt: skip
                if "tools" in b and ("calls" in asked or "schema" in asked):
                    reader = CallReader(tags if "calls" in asked else None)
                    reader.feed(want)  # streamed, a call cut short has gone out as far as it was written
                    content = read_tagged(want, tags)[0] if "calls" in asked else None
                    calls = reader.begun() if job["stream"] else reader.done()
                    want = answer({"content": content, "tool_calls": calls})
                counts["compared"] += 1
                counts["chat"] += "messages" in b
                counts["tools"] = counts.get("tools", 0) + ("tools" in b)
                counts["wrong"] += text != (prompt if b.get("echo") else "") + want
    g.close()
    return counts


def slope(xs: list[float], ys: list[float]) -> float:
    """The least-squares slope of ys over xs."""
    return float(np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)[0])


def memory_trends(s: list) -> dict[str, float]:
    """growth: total PSS from the sample at GROWTH_FROM requests to the highest (a batch that runs
    empty lets go of memory); server_slope: the server's anonymous PSS over the second half, MB per 1,000 requests;
    workers_drift: the workers' lowest anonymous PSS of the last third minus that of the middle.
    The total and the workers' are net of the prompt snapshots (bounded by their budget, they fill
    it by design; the workers' heaps hold only those not in files). The last sample, read as the other clients' requests
    drain, is left out of both (a drained batch sits below a loaded one)."""
    loaded = s[:-1]
    half, third = loaded[len(loaded) // 2 :], len(loaded) // 3
    total = [x[2] - x[5] for x in s]
    workers = [x[4] - (x[5] - x[6]) for x in loaded]
    start = next(i for i, x in enumerate(s) if x[0] >= min(GROWTH_FROM, s[-1][0]))
    return {
        "growth": max(total) - total[start],
        "server_slope": 1000 * slope([x[0] for x in half], [x[3] for x in half]),
        "workers_drift": min(workers[2 * third :]) - min(workers[third : 2 * third]),
        "snapshots": max(x[5] for x in s),
        "files": max(x[6] for x in s),
    }


def targets(r: dict) -> list[dict]:
    c, s = r["counts"], r["samples"]
    m = memory_trends(s)
    rows = [
        ("choices != the request alone", c["wrong"], "== 0", c["wrong"] == 0),
        ("server errors and failed connections", c["errors"], "== 0", c["errors"] == 0),
        ("malformed requests not answered 4xx", c["bad_not_4xx"], "== 0", c["bad_not_4xx"] == 0),
        ("requests decoding or queued at the end", sum(r["idle"].values()), "== 0", not any(r["idle"].values())),
        (f"memory (PSS of the process group, net of prompt snapshots) growth, request {GROWTH_FROM} to the "
         f"highest of {len(s)} samples (MB)", m["growth"], f"<= {GROWTH_BOUND_MB:g}", m["growth"] <= GROWTH_BOUND_MB),
        ("server heap (anonymous PSS): slope over the second half (MB per 1,000 requests)", m["server_slope"],
         f"<= {SERVER_SLOPE_BOUND:g}", m["server_slope"] <= SERVER_SLOPE_BOUND),
        ("workers' heaps (anonymous PSS, net of prompt snapshots): lowest of the last third minus lowest of the "
         "middle third (MB)", m["workers_drift"], f"<= {WORKER_DRIFT_BOUND_MB:g}",
         m["workers_drift"] <= WORKER_DRIFT_BOUND_MB),
        ("prompt snapshots, most held (MB)", m["snapshots"], f"<= {r['snapshot_budget_mb']:g} (the lanes' budget)",
         m["snapshots"] <= r["snapshot_budget_mb"]),
        ("their files in /dev/shm, most held (MB)", m["files"], f"<= {r['snapshot_budget_mb']:g}",
         m["files"] <= r["snapshot_budget_mb"]),
        ("snapshot directories left once the server stopped", r.get("dirs_left", 0), "== 0", not r.get("dirs_left")),
    ]  # fmt: skip
    return [{"target": t, "value": float(v), "bound": b, "met": bool(ok)} for t, v, b, ok in rows]


def render(r: dict) -> str:
    m, c = r["meta"], r["counts"]
    lines = [
        "# Serving soak: a long mixed load on `fastblt serve`",
        "",
        f"`{m['command']}` — {m['date']}, {m['machine']}, {m['cpu_count']} CPUs shared by server and client, "
        f"onnxruntime {m['onnxruntime']}. Server at its defaults"
        f"{' but ' + ' '.join(m['server_args']) if m.get('server_args') else ''}; {CLIENTS} clients, "
        f"{m['requests']} requests in {r['wall_s']:.0f} s: every mode, greedy and seeded sampling, 8-160 bytes, "
        "some with n 2-3, two prompts, logprobs, echo or scoring only, a logit bias and penalties, JSON mode and "
        "schemas, chat completions (with tool calls), "
        "a fifth streamed "
        "(a third of those dropped "
        "mid-stream), one in twelve malformed.",
        "",
        "## Targets",
        "",
        *targets_table(r["targets"]),
        "",
        "## Requests",
        "",
        "| finished | choices compared with Generator | chat ones | with tools | dropped mid-stream | malformed -> 4xx "
        "| errors |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {c['ok']} | {c['compared']} | {c.get('chat', '')} | {c.get('tools', '')} | {c['dropped']} | {c['bad_4xx']} "
        f"| {c['errors']} |",
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
        "## Server memory",
        "",
        "PSS: the proportional set size over the server's process group (the server, its lane workers, their "
        "zygote); anonymous: the part of it that is not file pages (heap), of the server and of the workers.",
        "",
        "| requests | seconds | PSS MB | server anonymous MB | workers anonymous MB | prompt snapshots MB | "
        "in /dev/shm MB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {n} | {t:.0f} | {mb:.0f} | {srv:.1f} | {wrk:.1f} | {snap:.1f} | {files:.1f} |"
            for n, t, mb, srv, wrk, snap, files in r["samples"]
        ),  # fmt: skip
        "",
    ]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, _, mb, srv, wrk, snap, _ = zip(*r["samples"], strict=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(n, mb, marker=".", label="PSS, process group")
    ax.plot(n, srv, marker=".", label="anonymous, server")
    ax.plot(n, wrk, marker=".", label="anonymous, workers")
    ax.plot(n, snap, marker=".", label="prompt snapshots (files in /dev/shm)")
    ax.set_xlabel("requests served")
    ax.set_ylabel("MB")
    ax.set_ylim(0, max(mb) * 1.15)
    ax.legend(fontsize=8)
    ax.set_title("fastblt serve under a mixed load: memory")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="requests in all (default 2,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-args", default="", metavar="ARGS",
                    help="more `fastblt serve` options for the server soaked, e.g. '--no-share-prompts' (its results "
                    "are saved under serve_soak_<--tag>)")  # fmt: skip
    ap.add_argument("--tag", default="variant", help="with --server-args: the results' name suffix")
    ap.add_argument("--render", type=Path, default=None, metavar="JSON",
                    help="re-render a saved result, its targets recomputed from its samples")  # fmt: skip
    args = ap.parse_args()
    if args.render is not None:
        r = json.loads(args.render.read_text())
        # results from before prompt snapshots had none, and from before their files none in /dev/shm
        r["samples"] = [[*x, 0.0, 0.0][:7] if len(x) < 7 else x for x in r["samples"]]
        r.setdefault("snapshot_budget_mb", 0.0)
        r["targets"] = targets(r)
        save(args.render.stem, r, render, plot)
        return
    if args.requests < 6 * SAMPLE_EVERY:
        ap.error(f"--requests: at least {6 * SAMPLE_EVERY}, to read memory six times")
    from fastblt.serve.process import ServerProcess

    jobs = draw_requests(args.requests, args.seed)
    command = "python benchmarks/serve_soak.py" + (f" --requests {args.requests}" if args.requests != 2000 else "")
    server_args = shlex.split(args.server_args)
    if server_args:
        command += f" --server-args {shlex.quote(args.server_args)} --tag {shlex.quote(args.tag)}"
    r: dict = {"meta": machine_meta() | {"command": command, "requests": args.requests, "server_args": server_args}}
    template = Path(tempfile.mkdtemp(prefix="fastblt-soak-")) / "transcript.jinja"
    template.write_text(CHAT_TEMPLATE)
    chat_args = ["--chat-template", str(template), *CALL_TAGS]
    with ServerProcess(server_args + chat_args) as srv:
        lanes = next(float(x.split()[-1]) for x in httpx.get(f"{srv.url}/metrics").text.splitlines()
                     if x.startswith("fastblt_batch_lanes "))  # fmt: skip
        r["snapshot_budget_mb"] = lanes * DEFAULT_MB
        run = asyncio.run(soak(srv, jobs))
        pid = srv.proc.pid
    r |= {"samples": run["samples"], "wall_s": run["wall_s"], "idle": run["idle"], "dirs_left": len(snapshot_dirs(pid))}
    r["layouts"] = [memory_of(name, args_ + chat_args, env, jobs[:LAYOUT_REQUESTS]) for name, args_, env in LAYOUTS]
    shutil.rmtree(template.parent)
    r["counts"] = check(jobs, run["results"])
    r["targets"] = targets(r)
    count = "" if args.requests == 2000 else f"_{args.requests}"
    name = "serve_soak" + count + (f"_{args.tag}" if server_args else "")
    save(name, r, render, plot)


if __name__ == "__main__":
    main()
