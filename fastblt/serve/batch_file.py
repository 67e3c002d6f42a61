"""OpenAI's batch files, run offline through the server's own app: `fastblt batch`.

An input file is JSON Lines, a request per line, as OpenAI's Batch API and vLLM's `run_batch` take
them:

    {"custom_id": "q1", "method": "POST", "url": "/v1/completions", "body": {"model": ..., "prompt": ...}}

Each body is answered by `create_app`'s app, called in process (no socket), so every field, check,
default and error is the server's, and its output line is written as soon as it ends (in the order
requests end; `custom_id` says which is which):

    {"id": "batch_req_<hex>", "custom_id": "q1",
     "response": {"status_code": 200, "request_id": "req_...", "body": {...}}, "error": null}

A request the server refuses (a wrong field) is answered with its 4xx and error body in its line;
the file's own form (JSON, custom_id unique, method, url, a body that does not ask to stream) is
checked before any request runs, naming the line. Up to `concurrency` requests are in flight, so
the engine's continuous batching keeps its rows full. An output that exists is never overwritten:
resuming (`answered`) reads the custom_ids it holds, cuts a last line a stopped run left half
written, and the run appends the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import Callable, Container
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from fastblt.errors import InputError
from fastblt.serve.api import generated
from fastblt.serve.app import call_app
from fastblt.serve.request_log import HEADER as REQUEST_ID_HEADER

URLS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
LINE_KEYS = {"custom_id", "method", "url", "body"}


@dataclass(frozen=True)
class BatchRequest:
    """One line of an input file."""

    line: int  # 1-based
    custom_id: str
    url: str
    body: bytes  # the body's JSON, as the app reads a request's


@dataclass
class BatchSummary:
    """What a run did: requests answered, by HTTP status, and the bytes their answers generated."""

    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    completion_bytes: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 200)


def read_requests(path: Path) -> list[BatchRequest]:
    """The requests of an input file, in order; InputError naming the line of the first that is not
    a request line (and the earlier line of a custom_id used twice)."""
    out: list[BatchRequest] = []
    seen: dict[str, int] = {}
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path}:{line}: not UTF-8 (byte {data[e.start]:#04x} at offset {e.start})") from None
    for n, raw in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028 as it is
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        try:
            item = json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as e:
            raise InputError(f"{where}: not JSON ({getattr(e, 'msg', 'nested too deep')})") from None
        if not isinstance(item, dict):
            raise InputError(f"{where}: expected an object with custom_id, method, url and body")
        if unknown := sorted(set(item) - LINE_KEYS):
            raise InputError(f"{where}: unknown field {unknown[0]!r} (a line has custom_id, method, url and body)")
        cid = item.get("custom_id")
        if not isinstance(cid, str) or not cid:
            raise InputError(f"{where}: custom_id: expected a non-empty string, got {cid!r:.60}")
        if cid in seen:
            raise InputError(f"{where}: custom_id {cid!r:.60} is line {seen[cid]}'s too; each must be unique")
        if item.get("method") != "POST":
            raise InputError(f'{where}: method: expected "POST", got {item.get("method")!r:.60}')
        if item.get("url") not in URLS:
            raise InputError(f"{where}: url: expected one of {', '.join(URLS)}, got {item.get('url')!r:.60}")
        body = item.get("body")
        if not isinstance(body, dict):
            raise InputError(f"{where}: body: expected an object, got {type(body).__name__}")
        if body.get("stream") not in (None, False):
            raise InputError(f"{where}: body.stream: a batch's answers are whole lines; leave stream out")
        if body.get("background") not in (None, False):
            raise InputError(f"{where}: body.background: a batch is answered in the background already; leave it out")
        seen[cid] = n
        out.append(BatchRequest(n, cid, item["url"], json.dumps(body, ensure_ascii=False).encode()))
    return out


def answered(path: Path, known: Container[str] | None = None) -> set[str]:
    """The custom_ids an output file (of an earlier run) answered, whatever their status. A last
    line without its newline (a run stopped while writing it) is cut off, so the run that resumes
    answers it again; a file with lines that are not ours, or (given the input's custom_ids,
    `known`) answers to requests the input lacks, is refused before anything is cut: resuming
    into another input's output would mix the two."""
    data = path.read_bytes()
    whole = data.rfind(b"\n") + 1
    ids = set()
    for n, raw in enumerate(data[:whole].splitlines(), 1):
        if not raw.strip():
            continue
        try:
            cid = json.loads(raw)["custom_id"]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}:{n}: not a line fastblt batch writes; resume into the file it wrote") from None
        if known is not None and cid not in known:
            raise InputError(f"{path}:{n}: custom_id {cid!r:.60} is not in the input; resume into the output written "
                             "for this input")  # fmt: skip
        ids.add(cid)
    if whole < len(data):  # only once every whole line is one of ours
        with path.open("r+b") as f:
            f.truncate(whole)
    return ids


def drop_errors(path: Path) -> int:
    """Remove from an output file (one `answered` has read) the lines whose answer is an error
    (status 400 or more), so that a run answers those requests again: the rest are kept byte for
    byte, the file written whole beside it and renamed over it. How many were removed."""
    kept, dropped = [], 0
    for raw in path.read_bytes().splitlines(keepends=True):
        status = (json.loads(raw).get("response") or {}).get("status_code", 0) if raw.strip() else 200
        if status >= 400 or status == 0:
            dropped += 1
        else:
            kept.append(raw)
    if dropped:
        write_whole(path, b"".join(kept))
    return dropped


def write_whole(path: Path, data: bytes) -> None:
    """`data` to `path` whole or not at all (written beside it, then renamed over it): a reader, or
    a run stopped halfway, never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def output_line(custom_id: str, response: dict | None, error: dict | None = None) -> bytes:
    """One line of an output file, as OpenAI's Batch API writes it: the answer's `response`
    (status_code, request_id, body), or none and the `error` that kept the request from running."""
    line = {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": custom_id, "response": response, "error": error}
    return json.dumps(line, ensure_ascii=False).encode() + b"\n"


async def run_batch(app: Any, requests: list[BatchRequest], out: BinaryIO, concurrency: int,
                    on_done: Callable[[int], None] | None = None) -> BatchSummary:  # fmt: skip
    """Answer `requests` through `app` (create_app's, started and stopped here: its lifespan),
    `concurrency` at a time, writing each answer's line to `out` (flushed) as it ends;
    `on_done(status)` after each."""
    async with app.router.lifespan_context(app):
        return await answer(app, requests, out, concurrency, on_done)


class Slots:
    """At most `limit()` holders at once (`async with slots`); the limit may change while requests
    wait (a Ray batch actor's grows and shrinks with the replicas). A release wakes as many waiters
    as the limit then has room for, not every waiter: a batch's requests all wait here."""

    def __init__(self, limit: Callable[[], int]):
        self.limit, self.held = limit, 0
        self._free = asyncio.Condition()

    async def __aenter__(self) -> None:
        async with self._free:
            await self._free.wait_for(lambda: self.held < self.limit())
            self.held += 1

    async def __aexit__(self, *exc: object) -> None:
        async with self._free:
            self.held -= 1
            self._free.notify(max(1, self.limit() - self.held))


async def answer(app: Any, requests: list[BatchRequest], out: BinaryIO, concurrency: int | Callable[[], int],
                 on_done: Callable[[int], None] | None = None, headers: dict[str, str] | None = None,
                 retry: bool = False, admit: Callable[[], AbstractAsyncContextManager] | None = None,
                 project: str | None = None) -> BatchSummary:  # fmt: skip
    """run_batch's work in an app that runs already (a server's), `concurrency` (or as many as it
    says at each request's turn) at a time, each request sent with `headers`
    (its API key), as `project`'s if given (app.call_app), inside `admit()` (held from when the
    server lets it go until its answer: the server's other requests first); with `retry`, one the
    server turns away for now (429, 503) is sent again after its Retry-After."""
    loop = asyncio.get_running_loop()
    summary, t0 = BatchSummary(), loop.time()
    slots = Slots(concurrency if callable(concurrency) else lambda: concurrency)

    async def one(req: BatchRequest) -> None:
        async with slots, (admit or contextlib.nullcontext)():
            status, got, body = await call_app(app, "POST", req.url, req.body, headers, project)
            while retry and status in (429, 503):
                await asyncio.sleep(_seconds(got.get("retry-after")))
                status, got, body = await call_app(app, "POST", req.url, req.body, headers, project)
        try:
            reply = json.loads(body)
        except ValueError:
            reply = {"error": {"message": body.decode("utf-8", "replace")[:500], "type": "server_error"}}
        out.write(output_line(req.custom_id, {"status_code": status, "request_id": got.get(REQUEST_ID_HEADER),
                                              "body": reply}))  # fmt: skip
        out.flush()
        summary.requests += 1
        summary.statuses[status] = summary.statuses.get(status, 0) + 1
        if status == 200:
            summary.completion_bytes += generated(reply.get("usage") or {})
        if on_done is not None:
            on_done(status)

    await asyncio.gather(*(one(r) for r in requests))
    summary.seconds = loop.time() - t0
    return summary


def _seconds(retry_after: str | None) -> float:
    """A Retry-After header's wait (seconds form; 1 s when absent or a date), within [0.1, 60]."""
    try:
        return min(max(float(retry_after or 1), 0.1), 60.0)
    except ValueError:
        return 1.0
