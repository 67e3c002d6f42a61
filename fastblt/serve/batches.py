"""OpenAI's Batch API on the server: `/v1/files` and `/v1/batches` (`fastblt serve --batch-dir DIR`).

A client uploads a batch input file (JSON Lines, as `fastblt batch` reads them: batch_file.py),
creates a batch on it, and later downloads what came back, as the openai client does it:
`files.create(purpose="batch")`, `batches.create`, `batches.retrieve`, `files.content`. The batch
runs inside the server, through its own app (batch_file.answer), each answer the server's to the
same body. Live traffic comes first: batches keep up to `concurrency` requests in flight on an
idle server, `trickle` while live requests run, none while any request waits for a row. A request
the queue turns away (429, 503) waits and is sent again: a batch has hours, not seconds.

Everything lives under DIR (files/, batches/), written whole or not at all (a temporary file
renamed), so a batch outlives the server: at the next start it resumes where it stopped, keeping
the answers written so far (batch_file.answered). Files expire as OpenAI's do: an upload 30 days
after it was made unless `expires_after` says otherwise, a batch's output files when its
`output_expires_after` says (else never); an expired file is gone from the API at once and from
DIR at the next sweep, or once no running batch reads it. Answers with a status under 400 go to the
output file, the others to the error file, as OpenAI splits them; a batch still running when its
24-hour window ends expires, each request it did not run an error line of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.datastructures import UploadFile

from fastblt.errors import InputError
from fastblt.serve.api import ApiError, cursor_page, generated, get_metadata, load_json
from fastblt.serve.batch_file import (
    URLS,
    BatchRequest,
    answer,
    answered,
    output_line,
    read_requests,
    write_whole,
)
from fastblt.serve.held import check_free, hold

MAX_FILE_BYTES = 200 << 20  # an uploaded file, as OpenAI's Batch API limits it
MAX_REQUESTS = 50_000  # requests per batch (OpenAI's limit)
WINDOW, WINDOW_S = "24h", 24 * 3600  # the one completion_window OpenAI offers
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")  # a batch the runner still owns
TTL_S = (3600, 30 * 24 * 3600)  # an expiration policy's seconds, as OpenAI bounds them
UPLOAD_TTL_S = TTL_S[1]  # an upload's when it names none (OpenAI's for purpose batch: the most allowed)
SWEEP_EVERY_S = 60.0  # how often expired files are deleted from DIR
SAVE_EVERY_S = 0.5  # a running batch's request_counts reach its file at most this often
BATCH_PRIORITY = 1  # a batch request's place in the engine's queue: behind live requests (priority 0)
ADMIT_POLL_S = 0.02  # how often a batch request waiting for live requests to get their rows looks again
_ID = re.compile(r"[A-Za-z0-9_-]{1,80}")  # ids made here; anything else names no file
LOCK = "batches.lock"  # in DIR, held by the one server that runs its batches (held.py)
WHAT = "files and batches"


def _new_id(prefix: str) -> str:
    """An id that sorts as its objects were made (lists are newest first), with a random tail."""
    return f"{prefix}{time.time_ns():016x}{secrets.token_hex(4)}"


def _write_json(path: Path, item: dict) -> None:
    write_whole(path, json.dumps(item).encode())


def _expired(meta: dict, now: float | None = None) -> bool:
    return meta["expires_at"] is not None and meta["expires_at"] <= (time.time() if now is None else now)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


class Store:
    """Files and batches under a directory: files/<id>.jsonl with files/<id>.json (OpenAI's file
    object), batches/<id>.json (the batch object) with batches/<id>.results.jsonl (its answers so
    far, in the order they ended). The objects are read once, at start, and kept in memory beside
    their files (a list or a /metrics scrape reads no file): the directory is the server's while
    it runs."""

    def __init__(self, root: Path):
        self.files_dir, self.batches_dir = root / "files", root / "batches"
        for d in (self.files_dir, self.batches_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._files = _objects(self.files_dir)
        self._batches = _objects(self.batches_dir)

    def content(self, fid: str) -> Path:
        return self.files_dir / f"{fid}.jsonl"

    def add_file(self, source: Path, filename: str, purpose: str, fid: str | None = None,
                 ttl: int | None = None, project: str = "") -> dict:  # fmt: skip
        """Move `source` (a file in files_dir) in as a file, under a new id or `fid`, expiring `ttl`
        seconds after it was made (None: never); a `project`'s (--project) names it."""
        fid, now = fid or _new_id("file-"), int(time.time())
        os.replace(source, self.content(fid))
        meta = {"id": fid, "object": "file", "bytes": self.content(fid).stat().st_size, "created_at": now,
                "filename": filename, "purpose": purpose, "status": "processed",
                "expires_at": None if ttl is None else now + ttl, "status_details": None}  # fmt: skip
        if project:
            meta["project"] = project
        _write_json(self.files_dir / f"{fid}.json", meta)
        self._files[fid] = meta
        return meta

    def file(self, fid: str) -> dict | None:
        """A file's object; None for one that does not exist or has expired."""
        meta = self._files.get(fid)
        return None if meta is None or _expired(meta) else meta

    def files(self) -> list[dict]:
        now = time.time()
        return [f for f in _newest_first(self._files) if not _expired(f, now)]

    def expired_files(self) -> list[str]:
        now = time.time()
        return [fid for fid, meta in self._files.items() if _expired(meta, now)]

    def delete_file(self, fid: str) -> None:
        self._files.pop(fid, None)
        (self.files_dir / f"{fid}.json").unlink(missing_ok=True)
        self.content(fid).unlink(missing_ok=True)

    def save(self, batch: dict) -> None:
        _write_json(self.batches_dir / f"{batch['id']}.json", batch)
        self._batches[batch["id"]] = batch

    def batch(self, bid: str) -> dict | None:
        return self._batches.get(bid)

    def batches(self) -> list[dict]:
        return _newest_first(self._batches)

    def results(self, bid: str) -> Path:
        return self.batches_dir / f"{bid}.results.jsonl"


def _objects(directory: Path) -> dict[str, dict]:
    """The objects saved in `directory` (<id>.json), by id."""
    found = (_read_json(p) for p in directory.glob("*.json") if _ID.fullmatch(p.stem))
    return {item["id"]: item for item in found if item}


def _newest_first(objects: dict[str, dict]) -> list[dict]:
    return sorted(objects.values(), key=lambda o: (o["created_at"], o["id"]), reverse=True)


def _statuses(path: Path) -> list[int]:
    """The status code of each answer in a results file."""
    if not path.exists():
        return []
    return [json.loads(line)["response"]["status_code"] for line in path.read_bytes().splitlines() if line.strip()]


def _split(results: Path, output: Path, errors: Path, expired: list[str]) -> tuple[int, int, dict]:
    """Answers under 400 to `output`, the rest to `errors`, then a `batch_expired` error line for
    each custom_id in `expired` that no answer has: (lines in each, the answers' usage summed as
    OpenAI's batch `usage`, in bytes as the server counts them)."""
    counts, done, used = [0, 0], set(), {"input": 0, "cached": 0, "output": 0}
    if results.exists():
        answered(results)  # a line a killed server left half written is cut: that request has no answer
    with output.open("wb") as ok, errors.open("wb") as bad:
        with results.open("rb") if results.exists() else io.BytesIO() as src:
            for line in src:
                if line.strip():
                    item = json.loads(line)
                    failed = item["response"]["status_code"] >= 400
                    (bad if failed else ok).write(line)
                    counts[failed] += 1
                    done.add(item["custom_id"])
                    usage = {} if failed else item["response"]["body"].get("usage") or {}
                    used["input"] += usage.get("prompt_tokens", usage.get("input_tokens", 0))
                    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
                    used["cached"] += details.get("cached_tokens", 0)
                    used["output"] += generated(usage)
        for cid in expired:
            if cid not in done:
                error = {"code": "batch_expired", "message": "not run before the batch's completion window ended"}
                bad.write(output_line(cid, None, error))
                counts[1] += 1
    usage = {"input_tokens": used["input"], "input_tokens_details": {"cached_tokens": used["cached"]},
             "output_tokens": used["output"], "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": used["input"] + used["output"]}  # fmt: skip
    return counts[0], counts[1], usage


def _requests(path: Path, endpoint: str) -> list[BatchRequest]:
    """A batch's requests from its input file; InputError if they cannot run as this batch."""
    requests = read_requests(path)
    if not requests:
        raise InputError(f"{path}: no requests in it")
    if len(requests) > MAX_REQUESTS:
        raise InputError(f"{path}: {len(requests)} requests; a batch holds at most {MAX_REQUESTS}")
    if wrong := next((r for r in requests if r.url != endpoint), None):
        raise InputError(f"{path}:{wrong.line}: url: {wrong.url} in a batch for {endpoint}")
    return requests


class Runner:
    """Runs batches as tasks of the server's event loop, through `app` (create_app's). A running
    batch's object is the task's (`live`), saved to the store as it changes; all of it on the
    loop's thread, so a cancel and the task never see each other half done."""

    def __init__(self, app: Any, store: Store, concurrency: int, headers: dict[str, str],
                 pressure: Callable[[], tuple[int, int]] = lambda: (0, 0), trickle: int = 1):  # fmt: skip
        self.app, self.store, self.concurrency, self.headers = app, store, concurrency, headers
        # the engine's load: requests it holds (batches' included) and those of them waiting for a row
        self.pressure, self.trickle = pressure, trickle
        self.inflight = 0  # batch requests sent and not answered yet, over every batch
        self.tasks: dict[str, asyncio.Task] = {}
        self.live: dict[str, dict] = {}
        self.expiring: set[str] = set()  # batches whose completion window ended while they ran
        self.stopping = False  # the server stops: a cancelled task leaves its batch active, to resume

    def batch(self, bid: str) -> dict | None:
        return self.live.get(bid) or self.store.batch(bid)

    def batches(self) -> list[dict]:
        return [self.live.get(b["id"], b) for b in self.store.batches()]

    def start(self, batch: dict) -> None:
        bid = batch["id"]
        self.live[bid] = batch
        loop = asyncio.get_running_loop()
        self.tasks[bid] = task = loop.create_task(self._run(batch), name=f"fastblt {bid}")
        timer = loop.call_later(max(0.0, batch["expires_at"] - time.time()), self._expire, bid)

        def done(_: asyncio.Task) -> None:
            timer.cancel()
            self.tasks.pop(bid, None)
            self.live.pop(bid, None)
            self.expiring.discard(bid)

        task.add_done_callback(done)

    def _expire(self, bid: str) -> None:
        """The completion window ended: stop the batch; what it answered is kept, the rest is
        reported as expired. One cancelled or finalizing already finishes as it is."""
        if bid in self.tasks and self.live[bid]["status"] in ("validating", "in_progress"):
            self.expiring.add(bid)
            self.tasks[bid].cancel()

    def cancel(self, bid: str) -> dict:
        """Mark a running batch cancelling and stop its task, which then keeps what it answered."""
        batch = self.live[bid]
        batch |= {"status": "cancelling", "cancelling_at": int(time.time())}
        self.store.save(batch)
        self.tasks[bid].cancel()
        return batch

    async def sweep(self) -> list[str]:
        """Delete the files past their `expires_at` from DIR, but for the input of a batch still
        running, which goes at a sweep after it ends: the ids deleted."""
        reading = {b["input_file_id"] for b in self.batches() if b["status"] in ACTIVE}
        gone = [fid for fid in self.store.expired_files() if fid not in reading]
        await asyncio.to_thread(lambda: [self.store.delete_file(fid) for fid in gone])
        return gone

    async def sweeping(self) -> None:
        while True:
            try:
                await self.sweep()
            except OSError as e:  # a file DIR would not let go of: said, and tried again at the next sweep
                logging.getLogger("fastblt.serve").warning("--batch-dir: an expired file stays: %s", e)
            await asyncio.sleep(SWEEP_EVERY_S)

    async def stop(self) -> None:
        self.stopping = True
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def _run(self, batch: dict) -> None:
        requests: list[BatchRequest] = []
        try:
            if batch["status"] in ("validating", "in_progress"):
                fid = batch["input_file_id"]
                path = self.store.content(fid)
                try:
                    requests = await asyncio.to_thread(_requests, path, batch["endpoint"])
                except InputError as e:
                    message = str(e).replace(str(path), fid)
                    line = re.match(rf"{re.escape(fid)}:(\d+):", message)
                    return self._fail(batch, "invalid_request", message, int(line[1]) if line else None)
                if batch["status"] == "validating":
                    model = json.loads(requests[0].body).get("model")
                    batch |= {"status": "in_progress", "in_progress_at": int(time.time()),
                              "model": model if isinstance(model, str) else None}  # fmt: skip
                    batch["request_counts"]["total"] = len(requests)
                    self.store.save(batch)
                await self._answer(batch, requests)
            await self._finish(batch)
        except asyncio.CancelledError:
            if self.stopping or batch["status"] == "finalizing":
                raise
            # a user's cancel or the window's end: what was answered is kept
            expired = None
            if batch["id"] in self.expiring:
                if not requests and batch["status"] == "in_progress":  # ended while it was being read again
                    with contextlib.suppress(InputError):
                        requests = await asyncio.to_thread(_requests, self.store.content(batch["input_file_id"]),
                                                           batch["endpoint"])  # fmt: skip
                expired = [r.custom_id for r in requests]
            await self._finish(batch, expired)
        except Exception as e:  # a batch's failure must not reach the server's loop
            self._fail(batch, "server_error", f"{type(e).__name__}: {e}")

    @contextlib.asynccontextmanager
    async def _row(self) -> AsyncIterator[None]:
        """Hold a batch request until the server has room for it: nothing is sent while any request
        waits for a row; while live requests run, batches keep `trickle` in flight; on an idle
        server, `concurrency`."""
        while not admits(*self.pressure(), self.inflight, self.concurrency, self.trickle):
            await asyncio.sleep(ADMIT_POLL_S)
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    def _fail(self, batch: dict, code: str, message: str, line: int | None = None) -> None:
        batch |= {"status": "failed", "failed_at": int(time.time()), "errors": _errors(code, message, line)}
        self.store.save(batch)

    async def _answer(self, batch: dict, requests: list[BatchRequest]) -> None:
        """Answer the requests the results file does not hold yet, counting as they end."""
        results = self.store.results(batch["id"])
        done = await asyncio.to_thread(answered, results) if results.exists() else set()
        statuses = await asyncio.to_thread(_statuses, results)
        counts = batch["request_counts"]
        counts["failed"] = sum(s >= 400 for s in statuses)
        counts["completed"] = len(statuses) - counts["failed"]
        saved = [time.monotonic()]

        def on_done(status: int) -> None:
            counts["failed" if status >= 400 else "completed"] += 1
            if time.monotonic() - saved[0] > SAVE_EVERY_S:
                self.store.save(batch)
                saved[0] = time.monotonic()

        todo = [_behind_live(r) for r in requests if r.custom_id not in done]
        with results.open("ab") as out:
            # as many in flight as `concurrency` says now: the Ray batch actor's follows the replicas
            await answer(self.app, todo, out, lambda: self.concurrency, on_done, self.headers, retry=True,
                         admit=self._row, project=_of(batch))  # fmt: skip
        self.store.save(batch)

    async def _finish(self, batch: dict, expired: list[str] | None = None) -> None:
        """Split the answers into the output and error files and close the batch: expired if its
        window ended (`expired`: its requests, those without an answer reported as such), else
        cancelled if it was asked to be, else completed. Set finalizing before any wait, so no
        cancel comes between."""
        batch |= {"status": "finalizing", "finalizing_at": batch.get("finalizing_at") or int(time.time())}
        self.store.save(batch)
        bid, results = batch["id"], self.store.results(batch["id"])
        stem = bid.removeprefix("batch_")
        out, err = (self.store.files_dir / f"{stem}.{kind}.tmp" for kind in ("output", "errors"))
        ok, failed, batch["usage"] = await asyncio.to_thread(_split, results, out, err, expired or [])
        keep = (batch.get("output_expires_after") or {}).get("seconds")
        for path, n, kind, key in ((out, ok, "output", "output_file_id"), (err, failed, "error", "error_file_id")):
            if n:
                meta = self.store.add_file(
                    path, f"{bid}_{kind}.jsonl", "batch_output", f"file-{stem}-{kind}", keep, _of(batch)
                )
                batch[key] = meta["id"]
            else:
                path.unlink()
        batch["request_counts"] |= {"completed": ok, "failed": failed}
        status = "expired" if expired is not None else "cancelled" if batch["cancelling_at"] else "completed"
        batch |= {"status": status, f"{status}_at": int(time.time())}
        self.store.save(batch)
        results.unlink(missing_ok=True)


def admits(held: int, waiting: int, inflight: int, concurrency: int, trickle: int) -> bool:
    """Whether a server lets one more batch request go: none while any request waits for a row
    (`waiting`, of the `held` it holds), while live ones run up to `trickle` in flight, on an idle
    server up to `concurrency` (`inflight`: the batch requests it holds already)."""
    cap = trickle if held - inflight > 0 else concurrency
    return waiting == 0 and inflight < cap


def _behind_live(request: BatchRequest) -> BatchRequest:
    """`request` queued behind live ones (priority BATCH_PRIORITY) unless its body sets a priority
    or service tier of its own: a live request that comes while it waits for a row goes first. A
    Response is not kept in the server's memory unless the body asks (its answer is in the output
    file; thousands of them would push out live conversations')."""
    body = json.loads(request.body)
    if not isinstance(body, dict):
        return request
    if "priority" not in body and "service_tier" not in body:
        body["priority"] = BATCH_PRIORITY
    if request.url == "/v1/responses":
        body.setdefault("store", False)
    return dataclasses.replace(request, body=json.dumps(body, ensure_ascii=False).encode())


def new_batch(input_file_id: str, endpoint: str, metadata: dict | None = None,
              output_ttl: int | None = None) -> dict:  # fmt: skip
    """A batch object as OpenAI's API writes one, validating, its window starting now; with
    `output_ttl`, the policy its output files will expire by, as the client gave it."""
    now = int(time.time())
    batch = {"id": _new_id("batch_"), "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": input_file_id, "completion_window": WINDOW, "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
            "expires_at": now + WINDOW_S, "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata,
            "model": None, "usage": None}  # fmt: skip
    if output_ttl is not None:
        batch["output_expires_after"] = {"anchor": "created_at", "seconds": output_ttl}
    return batch


def expiry_seconds(anchor: object, seconds: object, field: str) -> int:
    """The seconds of an expiration policy (`{"anchor": "created_at", "seconds": N}`, N in
    [3600, 2592000] as OpenAI bounds it); a form's fields arrive as text."""
    if anchor != "created_at":
        raise ApiError(400, f'{field}.anchor: expected "created_at", got {anchor!r:.40}', f"{field}.anchor")
    if isinstance(seconds, str) and seconds.isascii() and seconds.isdigit():
        seconds = int(seconds)
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not TTL_S[0] <= seconds <= TTL_S[1]:
        raise ApiError(400, f"{field}.seconds: expected an integer in [{TTL_S[0]}, {TTL_S[1]}], got {seconds!r:.40}",
                       f"{field}.seconds")  # fmt: skip
    return seconds


class BatchCollector(Collector):
    """The Batch API on /metrics, read when Prometheus scrapes: batches by status, and the requests
    of running batches not answered yet (the work they still hold)."""

    def __init__(self, runner: Runner):
        self.runner = runner

    def collect(self) -> Iterator:
        batches = self.runner.batches()
        by_status = GaugeMetricFamily("fastblt_batches", "Batches kept in --batch-dir, by status.", labels=["status"])
        for status in ("validating", "in_progress", "finalizing", "cancelling", "completed", "failed", "cancelled",
                       "expired"):  # fmt: skip
            by_status.add_metric([status], sum(b["status"] == status for b in batches))
        yield by_status
        waiting = sum(b["request_counts"]["total"] - b["request_counts"]["completed"] - b["request_counts"]["failed"]
                      for b in batches if b["status"] == "in_progress")  # fmt: skip
        yield GaugeMetricFamily("fastblt_batch_requests_pending", "Requests of running batches not answered yet.",
                                value=waiting)  # fmt: skip
        yield GaugeMetricFamily("fastblt_batch_request_slots", "Batch requests kept in flight at most on an idle "
                                "server (on Ray: over every replica).", value=self.runner.concurrency)  # fmt: skip


def _errors(code: str, message: str, line: int | None = None) -> dict:
    return {"object": "list", "data": [{"code": code, "message": message, "param": None, "line": line}]}


def hold_batches(root: Path) -> None:
    """Take `root` for this process (held.py): InputError if another server runs its batches."""
    hold(root, LOCK, WHAT)


def check_batches(root: Path) -> None:
    """InputError if another server runs the batches in `root`; nothing is taken."""
    check_free(root, LOCK, WHAT)


class Batches:
    """The Batch API's work on one directory: its files and batches (Store) and the batches
    running (Runner), answered through `app`. Each method is what one route does once its request
    is read; errors are ApiErrors. The server's routes call it in this process, or, on Ray, in the
    one actor that holds the directory (ray_batches.py)."""

    def __init__(self, root: Path, app: Any, concurrency: int, headers: dict[str, str], trickle: int = 1):
        self.store = Store(root)
        self.runner = Runner(app, self.store, concurrency, headers, trickle=trickle)
        self.scratch: Path | None = self.store.files_dir  # where an upload is written before it is added
        self._sweeper: asyncio.Task | None = None

    async def open(self, pressure: Callable[[], tuple[int, int]] | None = None) -> None:
        """Resume the batches the last server left running, and sweep expired files (on the
        running loop); `pressure`: the engine's load, which batches make room for."""
        if pressure is not None:
            self.runner.pressure = pressure
        for batch in self.store.batches():
            if batch["status"] in ACTIVE:
                self.runner.start(batch)
        self._sweeper = asyncio.get_running_loop().create_task(self.runner.sweeping(), name="fastblt file sweep")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.runner.stop()

    async def upload(self, source: Path | bytes, filename: str, keep: int, project: str = "") -> dict:
        """Add an uploaded batch file (a file in `scratch`, moved in, or its bytes), to expire
        `keep` seconds after: the `project`'s."""
        if isinstance(source, bytes):
            fd, tmp = tempfile.mkstemp(dir=self.store.files_dir, suffix=".upload")
            with os.fdopen(fd, "wb") as out:
                out.write(source)
            source = Path(tmp)
        try:
            return await asyncio.to_thread(self.store.add_file, source, filename, "batch", None, keep, project)
        finally:
            source.unlink(missing_ok=True)

    # a project (--project) reaches only its own files and batches: another's are not found
    async def files(self, purpose: str | None = None, project: str = "") -> list[dict]:
        items = [f for f in self.store.files() if _of(f) == project]
        return items if not purpose else [f for f in items if f["purpose"] == purpose]

    async def file(self, fid: str, project: str = "") -> dict:
        return _found(self.store.file(fid), "file", fid, project)

    async def content(self, fid: str, whole: bool = False, project: str = "") -> Path | bytes:
        """A file's content: its path here, or (`whole`) its bytes, for a caller on another node."""
        _found(self.store.file(fid), "file", fid, project)
        path = self.store.content(fid)
        return await asyncio.to_thread(path.read_bytes) if whole else path

    async def delete_file(self, fid: str, project: str = "") -> dict:
        _found(self.store.file(fid), "file", fid, project)
        runner = self.runner
        if user := next((b for b in runner.batches() if b["input_file_id"] == fid and b["status"] in ACTIVE), None):
            raise ApiError(409, f"file {fid}: batch {user['id']} is {user['status']} on it; delete it after",
                           None, "file_in_use")  # fmt: skip
        self.store.delete_file(fid)
        return {"id": fid, "object": "file", "deleted": True}

    async def create(self, body: dict, project: str = "") -> dict:
        """A batch for the body of POST /v1/batches, started: the `project`'s, its requests too."""
        fields = {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
        if unknown := sorted(set(body) - fields):
            raise ApiError(400, f"{unknown[0]}: not a field of a batch", unknown[0])
        fid = body.get("input_file_id")
        meta = self.store.file(fid) if isinstance(fid, str) else None
        if meta is None or _of(meta) != project or meta["purpose"] != "batch":
            raise ApiError(400, f"input_file_id: {fid!r:.80} is no file uploaded with purpose batch",
                           "input_file_id")  # fmt: skip
        if body.get("endpoint") not in URLS:
            raise ApiError(400, f"endpoint: expected one of {', '.join(URLS)}, got {body.get('endpoint')!r:.60}",
                           "endpoint")  # fmt: skip
        if body.get("completion_window") != WINDOW:
            raise ApiError(400, f"completion_window: expected {WINDOW!r}, got {body.get('completion_window')!r:.40}",
                           "completion_window")  # fmt: skip
        metadata = get_metadata(body)
        output_ttl = None
        if (policy := body.get("output_expires_after")) is not None:
            if not isinstance(policy, dict) or set(policy) - {"anchor", "seconds"}:
                raise ApiError(400, 'output_expires_after: expected {"anchor": "created_at", "seconds": N}',
                               "output_expires_after")  # fmt: skip
            output_ttl = expiry_seconds(policy.get("anchor"), policy.get("seconds"), "output_expires_after")
        batch = new_batch(fid, body["endpoint"], metadata, output_ttl)
        if project:
            batch["project"] = project
        self.store.save(batch)
        self.runner.start(batch)
        return batch

    async def batches(self, project: str = "") -> list[dict]:
        return [b for b in self.runner.batches() if _of(b) == project]

    async def batch(self, bid: str, project: str = "") -> dict:
        return _found(self.runner.batch(bid), "batch", bid, project)

    async def cancel(self, bid: str, project: str = "") -> dict:
        batch = _found(self.runner.batch(bid), "batch", bid, project)
        if batch["status"] not in ("validating", "in_progress") or bid not in self.runner.tasks:
            raise ApiError(409, f"batch {bid} is {batch['status']}: only a running batch can be cancelled",
                           None, "batch_not_running")  # fmt: skip
        return self.runner.cancel(bid)


def _of(item: dict) -> str:
    """The project whose file or batch `item` is ("": the default project's)."""
    return item.get("project", "")


def _found(item: dict | None, what: str, given: str, project: str) -> dict:
    if item is None or _of(item) != project:
        raise ApiError(404, f"{what} {given!r:.80}: no such {what} here", None, f"{what}_not_found")
    return item


def add_batch_api(app: FastAPI, root: Path, concurrency: int, trickle: int = 1, api_key: str | None = None) -> None:
    """Serve /v1/files and /v1/batches from `app` (create_app's), keeping them under `root`. Live
    traffic first: batches run up to `concurrency` requests at a time on an idle server, `trickle`
    while live requests run, none while any request waits for a row; each with the server's API key."""
    hold_batches(root)  # the one server that runs the batches there
    headers = {} if api_key is None else {"authorization": f"Bearer {api_key}"}
    batches = Batches(root, app, concurrency, headers, trickle)

    @contextlib.asynccontextmanager
    async def running(app: FastAPI) -> AsyncIterator[None]:
        engine = app.state.ready()
        app.state.metrics().registry.register(BatchCollector(batches.runner))
        await batches.open(lambda: (engine.held, engine.waiting))
        try:
            yield
        finally:
            await batches.close()

    app.state.lifespans.append(running)
    add_batch_routes(app, batches)


def add_batch_routes(app: FastAPI, batches: Any) -> None:
    """/v1/files and /v1/batches over `batches` (a Batches here, or ray_batches.RayBatches): the
    routes read and check each request, and `batches` does its work."""

    def checked(request: Request) -> str:
        """The request's project (or a 401)."""
        return request.app.state.authorize(request)

    async def upload(request: Request) -> JSONResponse:
        project = checked(request)
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():  # the server holds a body to its stated length, and no longer
            raise ApiError(411, "body: an upload needs a Content-Length", None, "length_required")
        if int(length) > MAX_FILE_BYTES + (1 << 16):  # the file and its multipart framing
            raise ApiError(413, f"file: {length} bytes exceed the limit of {MAX_FILE_BYTES}", "file", "file_too_large")
        async with request.form(max_files=1, max_fields=4) as form:
            if (purpose := form.get("purpose")) != "batch":
                raise ApiError(400, f'purpose: expected "batch" (the only files served here), got {purpose!r:.40}',
                               "purpose")  # fmt: skip
            part = form.get("file")
            if not isinstance(part, UploadFile):
                raise ApiError(400, "file: expected a file part (multipart/form-data)", "file")
            anchor, seconds = form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
            keep = UPLOAD_TTL_S
            if anchor is not None or seconds is not None:
                keep = expiry_seconds(anchor, seconds, "expires_after")
            source = await asyncio.to_thread(_copied_upload, part, batches.scratch)
        name = os.path.basename(part.filename or "upload.jsonl")[:255]
        try:
            return JSONResponse(await batches.upload(source, name, keep, project))
        finally:
            if isinstance(source, Path):
                source.unlink(missing_ok=True)

    async def list_files(request: Request) -> JSONResponse:
        items = await batches.files(request.query_params.get("purpose"), checked(request))
        return JSONResponse(cursor_page(items, request.query_params))

    async def get_file(request: Request, file_id: str) -> JSONResponse:
        return JSONResponse(await batches.file(file_id, project=checked(request)))

    async def file_content(request: Request, file_id: str) -> Response:
        content = await batches.content(file_id, project=checked(request))
        if isinstance(content, Path):
            return FileResponse(content, media_type="application/jsonl")
        return Response(content, media_type="application/jsonl")

    async def delete_file(request: Request, file_id: str) -> JSONResponse:
        return JSONResponse(await batches.delete_file(file_id, checked(request)))

    async def create_batch(request: Request) -> JSONResponse:
        project = checked(request)
        request.app.state.ready()
        return JSONResponse(await batches.create(load_json(await request.body()), project))

    async def list_batches(request: Request) -> JSONResponse:
        return JSONResponse(cursor_page(await batches.batches(checked(request)), request.query_params))

    async def get_batch(request: Request, batch_id: str) -> JSONResponse:
        return JSONResponse(await batches.batch(batch_id, checked(request)))

    async def cancel_batch(request: Request, batch_id: str) -> JSONResponse:
        return JSONResponse(await batches.cancel(batch_id, checked(request)))

    routes: list[tuple[str, Callable, list[str]]] = [
        ("/v1/files", upload, ["POST"]), ("/v1/files", list_files, ["GET"]),
        ("/v1/files/{file_id}", get_file, ["GET"]), ("/v1/files/{file_id}", delete_file, ["DELETE"]),
        ("/v1/files/{file_id}/content", file_content, ["GET"]),
        ("/v1/batches", create_batch, ["POST"]), ("/v1/batches", list_batches, ["GET"]),
        ("/v1/batches/{batch_id}", get_batch, ["GET"]), ("/v1/batches/{batch_id}/cancel", cancel_batch, ["POST"]),
    ]  # fmt: skip
    for path, endpoint, methods in routes:
        app.add_api_route(path, endpoint, methods=methods)


def _copied_upload(part: UploadFile, scratch: Path | None) -> Path | bytes:
    """An uploaded part copied out of the form (refused past MAX_FILE_BYTES): a file in `scratch`
    (the batch directory's, to be moved in), or with no scratch here, its bytes."""
    if scratch is None:
        part.file.seek(0, os.SEEK_END)
        if (size := part.file.tell()) > MAX_FILE_BYTES:
            raise ApiError(413, f"file: {size} bytes exceed the limit of {MAX_FILE_BYTES}", "file", "file_too_large")
        part.file.seek(0)
        return part.file.read()
    fd, tmp = tempfile.mkstemp(dir=scratch, suffix=".upload")
    try:
        with os.fdopen(fd, "wb") as out:
            part.file.seek(0)
            shutil.copyfileobj(part.file, out)
            size = out.tell()
        if size > MAX_FILE_BYTES:
            raise ApiError(413, f"file: {size} bytes exceed the limit of {MAX_FILE_BYTES}", "file", "file_too_large")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)
