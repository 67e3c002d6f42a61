"""The asyncio face of the batch engine, for services that embed fastblt rather than call HTTP.

    engine = fastblt.AsyncEngine("default", backend="ort", max_batch=16)
    out = await engine.generate("def main(", mode="blt-s", max_bytes=128)
    stream = engine.stream("def main(", mode="ar", max_bytes=64)
    async for text in stream:
        ...
    stream.generation  # the finished Generation

Requests from any number of tasks share the engine's batch loops (batch.py, one BatchEngine per
*lane*, each with its own backend sessions and its share of `max_batch` rows, on a thread of this
process or in a worker process of its own): awaiting never blocks the event loop on a step call.
A request runs on one lane, the one holding the fewest requests when it arrives (at mixed
priorities, first the one where it waits behind the fewest of its own priority or a higher one),
and computes there what it computes alone. For the ort backend on a CPU the default is a lane per core
(`default_lanes`; benchmarks/results/batch_scaling.md and serve_load.md measure one lane against
two on 2 cores), each in a worker process (lane_process.py) when the checkpoint is given by name
or path: as threads, every lane's Python between step calls and the event loop's take turns on
one GIL.
Cancelling the awaiting task (or leaving `async for` early and closing the stream) cancels the
request; its row is free before the batch's next step. Bad requests raise `FastBltError` when
they are made, before they are queued; a full queue raises `EngineBusy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from fastblt.engines.base import Backend
from fastblt.errors import Cancelled, EngineBusy, EngineClosed, InputError
from fastblt.machine import cpu_cores, memory_available
from fastblt.model.blt import BltModel
from fastblt.runtime import courtesy
from fastblt.runtime.batch import DEFAULT_MAX_BATCH, BatchEngine, BatchStats, Ticket, check_sizes, sum_stats
from fastblt.runtime.engine import Engine, open_engine
from fastblt.runtime.generator import Generation, Generator
from fastblt.runtime.lane_process import CANCEL_GRACE, ProcessLane, start_zygote
from fastblt.runtime.options import Request, checked
from fastblt.runtime.prompt_cache import PromptCache, prompt_keys
from fastblt.runtime.prompt_share import remove_dir, share_dir
from fastblt.runtime.stream import Scores
from fastblt.runtime.wakeups import wake
from fastblt.runtime.zygote import Zygote


class AsyncEngine:
    """Batched generation over one backend, awaited from asyncio.

    Args:
        checkpoint_or_model, backend: as for `Generator`.
        max_batch: sequences decoding at once, over all lanes (None: 16, or fewer if the trt
            engines take fewer).
        max_queue: requests waiting for a row (over all lanes) beyond which new ones raise EngineBusy.
        max_context: optional limit on ids (prompt + output) per request.
        lanes: batch loops, each with its own backend sessions and max_batch / lanes rows (None:
            `default_lanes`, lowered by `memory_lanes`). More than one needs a backend given by name.
        processes: run each lane in a worker process of its own (None: `default_processes`).
            Needs a backend given by name and a checkpoint given by name or path.
        cores: the cores the lanes share (None: those this process may use, `machine.cpu_cores`);
            e.g. what a scheduler reserved for it without pinning it.
        share_prompts: lanes load each other's prompt snapshots: worker lanes on the host through
            files in /dev/shm (prompt_share.py; without /dev/shm each keeps its own), thread lanes
            from one cache of all their budgets. False: each lane finds only the snapshots it took.
        load: Generator's other keyword arguments (artifacts, threads, cache_dir, device,
            cuda_graphs, on_export, prompt_cache_mb: per lane); loading happens here, once per
            lane (the model once). With `threads` None on ort, each lane's per-byte steps run on
            one thread and its global step on `global_threads`.
    """

    def __init__(
        self,
        checkpoint_or_model: str | Path | BltModel = "default",
        backend: str | Backend | Engine = "ort",
        max_batch: int | None = None,
        max_queue: int = 256,
        max_context: int | None = None,
        lanes: int | None = None,
        processes: bool | None = None,
        cores: int | None = None,
        share_prompts: bool = True,
        **load: Any,
    ):
        if lanes is not None and (not isinstance(lanes, int) or isinstance(lanes, bool) or lanes < 1):
            raise InputError(f"lanes: expected an int >= 1, got {lanes!r}")
        if lanes is not None and lanes > 1 and not isinstance(backend, str):
            raise InputError("lanes: more than one lane opens the backend once per lane; give the backend by name")
        if cores is not None and (not isinstance(cores, int) or isinstance(cores, bool) or cores < 1):
            raise InputError(f"cores: expected an int >= 1, got {cores!r}")
        if processes is not None and not isinstance(processes, bool):
            raise InputError(f"processes: expected True, False or None, got {processes!r}")
        if not isinstance(share_prompts, bool):
            raise InputError(f"share_prompts: expected True or False, got {share_prompts!r}")
        unknown = sorted(set(load) - LOAD_ARGS)
        if unknown:
            raise InputError(f"{', '.join(unknown)}: unknown; AsyncEngine also takes {', '.join(sorted(LOAD_ARGS))}")
        check_sizes(1 if max_batch is None else max_batch, max_queue)  # before any lane is opened
        self.cores = cores or cpu_cores()
        asked = lanes is not None
        if asked:
            lanes = min(lanes, max_batch or lanes)  # every lane holds at least one row
        else:
            lanes = default_lanes(backend, self.cores, max_batch, processes is not False)  # lowered below
        given_threads = load.pop("threads", None)
        # ort lanes split the cores: per-byte steps on one thread each, the global step on a
        # lane's share (set once the lanes are known); torch sets its threads process-wide
        split = backend == "ort" and given_threads is None
        threads = 1 if split and lanes > 1 else given_threads
        self.generator = Generator(checkpoint_or_model, backend, max_context=max_context, threads=threads, **load)
        g = self.generator
        self.config, self.model = g.config, g.model
        if not asked and g.device.type != "cpu":
            lanes = 1  # the default counts CPU cores; on a GPU one lane feeds it
        defaulted = processes is None
        if defaulted:
            processes = default_processes(backend, lanes, g)
        elif processes and (not isinstance(backend, str) or g.checkpoint_path is None):
            raise InputError("processes: a worker process loads the checkpoint itself; give it and the backend by name")
        if not asked:
            lanes = min(lanes, THREAD_LANES) if not processes else min(lanes, memory_lanes(lane_bytes(g)))
            processes = processes and (lanes > 1 or not defaulted)  # one lane: a worker only if asked for
        self.engines, self.lanes = [g.engine], []
        self._homes = PromptHomes()
        self._zygote: Zygote | None = None
        self._prompt_dir: Path | None = None  # the lanes' prompt snapshot files (prompt_share.py)
        self._pooled: PromptCache | None = None  # thread lanes' one prompt cache
        self._peers_lock = threading.Lock()
        load.pop("on_export", None)  # told once, by the first lane's export
        if max_batch is None:
            rows = g.engine.backend.max_rows
            max_batch = min(DEFAULT_MAX_BATCH, rows * lanes if rows else DEFAULT_MAX_BATCH)
        self.max_queue = max_queue
        # the backend's default global threads are every core: right only for a lone lane on them all
        own = threads is None and self.cores == cpu_cores()
        shared = global_threads(self.cores, lanes) if split and not own else None
        if share_prompts and lanes > 1 and g.engine.prompts.budget:
            if not processes:  # threads of one process: one cache of every lane's budget
                self._pooled = PromptCache(g.engine.prompts.budget * lanes / 2**20)
            elif g.device.type == "cpu":
                self._prompt_dir = share_dir()  # None where there is no shared memory: each lane keeps its own
        start = self._start_processes if processes else self._start_threads
        try:
            start(backend, lanes, max_batch, max_queue, max_context, {"threads": threads, **load}, shared)
        except BaseException:  # a lane that cannot start: give back what the others took
            _stop_lanes(self.lanes, self._zygote, self._prompt_dir)
            self._zygote = None
            for e in self.engines[1:]:
                e.close()
            g.close()
            raise
        # an engine dropped without close() still ends its worker processes (and zygote)
        self._finalizer = weakref.finalize(self, _stop_lanes, list(self.lanes), self._zygote, self._prompt_dir)

    def _start_threads(self, backend: str | Backend | Engine, lanes: int, max_batch: int, max_queue: int,
                       max_context: int | None, load: dict[str, Any], shared: int | None) -> None:  # fmt: skip
        """Lanes as threads of this process: the Generator's engine and lanes - 1 more; `shared`: each
        lane's global-step threads (None: the backend's own)."""
        g = self.generator
        for _ in range(lanes - 1):
            self.engines.append(open_engine(g.model, backend, g.checkpoint_path, **load))  # type: ignore[arg-type]
        for i, e in enumerate(self.engines):
            if shared is not None:
                e.backend.set_global_threads(shared)  # type: ignore[attr-defined]
            if self._pooled is not None:
                e.prompts = self._pooled
            queue = share(max_queue, lanes, i)
            self.lanes.append(BatchEngine(e, share(max_batch, lanes, i), queue, max_context, g.backend_name,
                                          g.params))  # fmt: skip

    def _start_processes(self, backend: str, lanes: int, max_batch: int, max_queue: int, max_context: int | None,
                         load: dict[str, Any], shared: int | None) -> None:  # fmt: skip
        """Lanes as worker processes, started together; the Generator's own sessions are let go
        (it keeps checking requests, and loads them again if it is asked to generate)."""
        g = self.generator
        assert g.checkpoint_path is not None
        if shared is not None:
            load = {**load, "global_threads": shared}
            if shared < self.cores:
                load["wide_global"] = self.cores  # a lane alone runs its global step on every core
        self._zygote = start_zygote()  # the workers share its imports
        for i in range(lanes):
            rows, queue = share(max_batch, lanes, i), share(max_queue, lanes, i)
            own = load if self._prompt_dir is None else {**load, "prompt_share": (str(self._prompt_dir), i)}
            self.lanes.append(ProcessLane(g.checkpoint_path, backend, rows, queue, max_context, own,
                                          zygote=self._zygote))  # fmt: skip
        for lane in self.lanes:
            lane.wait_ready()
            lane.on_change = _weakly(self._update_peers)  # a lane must not keep its engine alive
        g.engine.backend.deactivate()

    def _update_peers(self) -> None:
        """Tell each worker lane whether another lane holds requests (after a request joins or
        leaves one): a lane alone runs its global step on every core."""
        if not self.processes:
            return
        with self._peers_lock:
            loads = [lane.load for lane in self.lanes]
            for lane, load in zip(self.lanes, loads, strict=True):
                lane.tell_peers(sum(loads) - load > 0)

    @property
    def batch(self) -> BatchEngine | ProcessLane:
        """The first lane (the only one with `lanes=1`)."""
        return self.lanes[0]

    @property
    def prompt_share_dir(self) -> Path | None:
        """Where the worker lanes share their prompt snapshots (prompt_share.py), or None."""
        return self._prompt_dir

    @property
    def processes(self) -> bool:
        """Whether the lanes run in worker processes."""
        return isinstance(self.lanes[0], ProcessLane)

    @property
    def stats(self) -> BatchStats:
        """A snapshot of the batch loops' counters and what they hold now (active rows, queue depth),
        summed over lanes (thread lanes' pooled snapshots once)."""
        out = sum_stats([lane.stats for lane in self.lanes])
        if self._pooled is not None:
            out.prompt_cache_bytes = self._pooled.stats.bytes
        return out

    @property
    def held(self) -> int:
        """Requests the lanes hold now, decoding or queued (their own counts: no worker is asked)."""
        return sum(lane.load for lane in self.lanes)

    @property
    def waiting(self) -> int:
        """Requests queued for a row now, over all lanes (their own counts: no worker is asked)."""
        return sum(max(0, lane.load - lane.max_batch) for lane in self.lanes)

    @property
    def lanes_alive(self) -> int:
        """Lanes whose batch loop still runs (a lane whose worker process died is not)."""
        return sum(lane.alive for lane in self.lanes)

    @property
    def lane_restarts(self) -> int:
        """Worker processes started again after one died, over all lanes."""
        return sum(getattr(lane, "restarts", 0) for lane in self.lanes)

    @property
    def max_batch(self) -> int:
        return sum(lane.max_batch for lane in self.lanes)

    @property
    def capacity(self) -> int:
        """Requests it can hold at once (every lane's rows and queue places): more are never taken."""
        return sum(lane.max_batch + lane.max_queue for lane in self.lanes)

    def _submit(self, request: Request, **callbacks: Any) -> Ticket:
        """Queue on the lane where it waits behind the fewest requests of its priority or a lower
        number (none: a free row, or a running request it preempts), then the one holding the fewest
        requests (of lanes holding as few, the one that last took this prompt: it keeps its
        snapshot), or the next with room; EngineBusy when none has, EngineClosed when every lane is
        closing (or its process is gone). At equal priorities that is the lane holding the fewest."""
        closed: EngineClosed | None = None
        thread = threading.get_ident()  # its event loop's: latency-bound while the request is in flight
        callbacks["on_done"] = _idle_when_done(thread, callbacks.get("on_done"))
        digests = prompt_digests(request, self.generator.engine.max_step) if len(self.lanes) > 1 else []
        home = self._homes.get(digests)

        def waits(lane: Any) -> int:  # requests it would wait behind there
            return max(0, lane.ahead(request.priority) - lane.max_batch + 1)

        for i in sorted(range(len(self.lanes)), key=lambda i: (waits(self.lanes[i]), self.lanes[i].load, i != home)):
            lane = self.lanes[i]
            courtesy.busy(thread)  # before submit: the request may end on the batch's thread at once
            try:
                ticket = lane.submit(request, **callbacks)
            except BaseException as e:
                courtesy.idle(thread)
                if isinstance(e, EngineBusy):
                    continue
                if isinstance(e, EngineClosed):
                    closed = e
                    continue
                raise
            self._homes.put(digests, i)
            self._update_peers()
            return ticket
        if closed is not None and all(lane.closed for lane in self.lanes):
            raise closed
        waiting = sum(lane.load for lane in self.lanes) - self.max_batch
        raise EngineBusy(f"engine: {waiting} requests already wait for a row (max_queue {self.max_queue})")

    def request(self, prompt: str | bytes, mode: str = "blt-d", max_bytes: int = 256, **options: Any) -> Request:
        """The checked Request `generate` would run (options as for Generator.generate)."""
        return self.generator.request(prompt, mode, max_bytes, **options)

    def _request(self, prompt: str | bytes | Request, mode: str, max_bytes: int, options: dict) -> Request:
        if isinstance(prompt, Request):
            if options or (mode, max_bytes) != ("blt-d", 256):
                raise InputError("generate: a Request carries its own mode, max_bytes and options; give it alone")
            return checked(prompt, self.config)
        return self.request(prompt, mode, max_bytes, **options)

    async def generate(
        self, prompt: str | bytes | Request, mode: str = "blt-d", max_bytes: int = 256, **options: Any
    ) -> Generation:
        """Generate as Generator.generate does, batched with every other request in flight."""
        req = self._request(prompt, mode, max_bytes, options)
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def finished(ticket: Ticket) -> None:
            wake(loop, lambda: _settle(done), ticket.cancel)

        ticket = self._submit(req, on_done=finished)
        try:
            await done
        except asyncio.CancelledError:
            ticket.cancel()
            raise
        return ticket.result(0)

    def stream(
        self, prompt: str | bytes | Request, mode: str = "blt-d", max_bytes: int = 256, **options: Any
    ) -> TextStream:
        """An async iterator of text chunks as they are verified (UTF-8-safe, stop strings held
        back, as Generator.stream); `.generation` once it is exhausted. Call it inside a running
        event loop: the request is queued at once (and refused at once when it is bad)."""
        return TextStream(self._submit, self._request(prompt, mode, max_bytes, options))

    def close(self, timeout: float | None = None) -> None:
        """Finish the requests in flight, then stop the batch loops and release the backends (every
        lane stops taking requests at once; `timeout` bounds the wait for all of them: what they
        still hold then is cancelled, and a worker process not stopped CANCEL_GRACE seconds later
        is killed)."""
        for lane in self.lanes:
            lane.close(0)
        deadline = None if timeout is None else time.monotonic() + timeout
        for lane in self.lanes:
            left = None if deadline is None else deadline - time.monotonic()
            if left is None or left > 0:
                lane.wait_closed(left)
        for lane in self.lanes:  # out of time: what they still hold is cancelled, all at once
            lane.close(0, cancel=True)
        grace_end = time.monotonic() + CANCEL_GRACE
        for lane in self.lanes:  # one grace for all of them; a worker still running after it is killed
            lane.close(max(grace_end - time.monotonic(), 0.05), cancel=True)
        self._finalizer.detach()
        self._close_zygote()
        remove_dir(self._prompt_dir)
        for e in self.engines[1:]:
            e.close()
        self.generator.close()

    def _close_zygote(self) -> None:
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)


# Generator's loading arguments, which AsyncEngine passes on (`**load`)
LOAD_ARGS = frozenset(inspect.signature(Generator).parameters) - {"checkpoint_or_model", "backend", "max_context"}


def _weakly(method: Callable[[], None]) -> Callable[[], None]:
    """`method`, called only while its object lives."""
    ref = weakref.WeakMethod(method)

    def call() -> None:
        bound = ref()
        if bound is not None:
            bound()

    return call


def _stop_lanes(lanes: list, zygote: Zygote | None, prompt_dir: Path | None = None) -> None:
    """An engine that was dropped unclosed: each lane cancels what it holds and stops, without
    waiting (this may run in the garbage collector), and the zygote and snapshot files go."""
    for lane in lanes:
        with contextlib.suppress(Exception):
            lane.close(0, cancel=True)
    if zygote is not None:
        with contextlib.suppress(Exception):
            zygote.close()
    remove_dir(prompt_dir)


THREAD_LANES = 2  # most lanes as threads of one process (three or four were slower than two on 2 cores)
MAX_LANES = 64  # most lanes by default (and `fastblt serve --lanes`): a process each
LANE_BASE_BYTES = 128 << 20  # a worker lane without its graphs (~100 MB forked from a zygote, ~200 MB on its own)


def default_lanes(backend: str | Backend | Engine, cores: int | None = None, max_batch: int | None = None,
                  processes: bool = True) -> int:  # fmt: skip
    """Lanes when none are asked for, before memory is counted (`memory_lanes`).

    The ort backend: one lane per core when lanes run in worker processes, at most `max_batch`
    (every lane holds a row) and MAX_LANES. A lane's per-byte steps run on one core (their matrices are too small
    to split: the hand-off costs more), so only more lanes keep more cores busy; on 2 cores two lanes
    made 16 streams ~1.3x faster than one lane of 16 rows and three were slower
    (benchmarks/results/batch_scaling.md). As threads of one process at most THREAD_LANES: their
    Python takes turns on one GIL. Other backends: one (torch's Python per op holds the GIL; a GPU
    is fed by one lane)."""
    if backend != "ort":
        return 1
    cores = cores or cpu_cores()
    return max(1, min(cores, max_batch or DEFAULT_MAX_BATCH, MAX_LANES if processes else THREAD_LANES))


def default_processes(backend: str | Backend | Engine, lanes: int, generator: Generator) -> bool:
    """Worker processes when there is more than one lane of the ort backend on a CPU and the
    checkpoint has a path the workers can load (measured on 2 cores: 16 streams 1.1-1.4x faster
    than thread lanes; benchmarks/results/batch_scaling.md, serve_load.md). The torch backend keeps one lane; a worker
    gets its end of the pipe as an inherited file descriptor, which needs POSIX."""
    cpu = generator.device.type == "cpu" and os.name == "posix"
    return lanes > 1 and backend == "ort" and cpu and generator.checkpoint_path is not None


def global_threads(cores: int, lanes: int) -> int:
    """Intra-op threads of each ort lane's global step: the lane's share of the cores, at least one
    (two lanes' global steps on every core at once fight over them: 16 streams 25% slower on 2
    cores). A worker lane alone gets every core back (`OrtBackend.widen_global`)."""
    return max(1, cores // lanes)


def lane_bytes(generator: Generator) -> int:
    """Memory a worker lane takes, estimated: LANE_BASE_BYTES and twice its graph files (onnxruntime
    keeps the weights and a prepacked copy of the matrices; the default checkpoint's 47 MB of graphs
    took 89 MB in a session; its worker's proportional set size was ~190 MB forked from a zygote,
    ~300 MB as a fresh interpreter), and its prompt snapshots' budget."""
    engine = generator.engine
    return LANE_BASE_BYTES + 2 * getattr(engine.backend, "graph_bytes", 0) + engine.prompts.budget


def memory_lanes(per_lane: int, available: int | None = None) -> int:
    """Worker lanes that fit in half the memory this process could still take (the rest is for the
    requests' caches, the server and whatever else runs here); unlimited when it cannot be read."""
    available = memory_available() if available is None else available
    return max(1, available // 2 // per_lane) if available is not None else 1 << 16


def share(total: int, parts: int, i: int) -> int:
    """Part i of `total` split as evenly as integers allow (the first parts take the remainder)."""
    return total // parts + (i < total % parts)


def prompt_digests(request: Request, max_step: int) -> list[bytes]:
    """The keys of the snapshots the request's prompt could load, deepest first (prompt_keys)."""
    return [key for _, key in prompt_keys(list(request.ids), request.opts.prefill_chunk or max_step)]


class PromptHomes:
    """The lane that last took each recent prompt, by its deepest snapshot keys (`prompt_digests`:
    those it keeps): a routing hint, so a collision costs a prefill, never a wrong byte."""

    SIZE = 4096  # keys remembered

    def __init__(self) -> None:
        self._lanes: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digests: list[bytes]) -> int | None:
        """The lane that last took a prompt with the deepest of these keys, or None."""
        with self._lock:
            return next((self._lanes[d] for d in digests if d in self._lanes), None)

    def put(self, digests: list[bytes], lane: int) -> None:
        with self._lock:
            for digest in digests[:2]:
                self._lanes[digest] = lane
                self._lanes.move_to_end(digest)
            while len(self._lanes) > self.SIZE:
                self._lanes.popitem(last=False)


def _idle_when_done(thread: int, on_done: Callable[[Ticket], None] | None) -> Callable[[Ticket], None]:
    """`on_done`, after ending the mark `_submit` put on `thread` for the request."""

    def done(ticket: Ticket) -> None:
        courtesy.idle(thread)
        if on_done is not None:
            on_done(ticket)

    return done


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class TextStream:
    """One streamed request: `async for text in stream`; `cancel()` or `aclose()` to stop it.

    Text the batch verifies while the consumer is busy is joined into one chunk: the batch thread
    wakes the event loop once per burst, not once per round, so many streams do not flood it.
    """

    def __init__(self, submit: Callable[..., Ticket], request: Request):
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._texts: list[str] = []
        self._scores: list[Scores] = []
        self._finished = False
        self._wake: asyncio.Event = asyncio.Event()
        self._waking = False
        self._ended = asyncio.Event()  # the request ended (what `pause` stops waiting at)
        self.generation: Generation | None = None
        # option logprobs: the scores of the chunk `__anext__` returned last (ids, logprobs, top)
        self.chunk_scores: Scores | None = None
        # the ticket reaches this stream weakly: a stream its consumer dropped (a `break` out of
        # `async for`, an exception in its body) is collected, and that cancels its request
        ref = weakref.ref(self)
        scored = request.opts.logprobs is not None
        self.ticket = submit(request, on_text=partial(_to_stream, ref, "_on_text"),
                             on_done=partial(_to_stream, ref, "_on_done"),
                             on_scores=partial(_to_stream, ref, "_on_scores") if scored else None)  # fmt: skip

    def _on_text(self, text: str) -> None:  # the batch's thread
        with self._lock:
            self._texts.append(text)
            self._signal()

    def _on_scores(self, scores: Scores) -> None:  # the batch's thread, before the chunk's text
        with self._lock:
            self._scores.append(scores)

    def _on_done(self, ticket: Ticket) -> None:  # the batch's thread
        with self._lock:
            self._finished = True
            self._signal()
        wake(self._loop, self._ended.set, lambda: None)

    def _signal(self) -> None:
        if self._loop.is_closed():  # nobody can read it any more: the row goes back to the batch
            ticket = getattr(self, "ticket", None)
            if ticket is not None:
                ticket.cancel()
            return
        if not self._waking:
            self._waking = True
            wake(self._loop, self._wake.set, self.cancel)

    def __aiter__(self) -> TextStream:
        return self

    async def __anext__(self) -> str:
        while True:
            with self._lock:
                texts, self._texts = self._texts, []
                scores, self._scores = self._scores, []
                finished, self._waking = self._finished, False
                self._wake.clear()
            if texts:
                self.chunk_scores = _joined(scores) if scores else None
                return "".join(texts)
            if finished or self.ticket.cancelled:
                if self.generation is None and finished:
                    self.generation = self.ticket.result(0)  # raises the request's error
                if self.generation is None:  # cancelled, its end not reported yet: the same answer at once
                    raise Cancelled("request cancelled")
                raise StopAsyncIteration
            try:
                await self._wake.wait()
            except asyncio.CancelledError:
                self.ticket.cancel()
                raise

    async def pause(self, seconds: float) -> None:
        """Wait `seconds`, less if the request ends first: a reader that takes the text at most so
        often (the server's --stream-interval) joins what comes meanwhile without holding the end."""
        if not self._ended.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), seconds)

    def cancel(self) -> None:
        """Stop the request (its row is freed before the batch's next step)."""
        self.ticket.cancel()

    async def aclose(self) -> None:
        if not self.ticket.done:
            self.ticket.cancel()

    async def __aenter__(self) -> TextStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        ticket = getattr(self, "ticket", None)
        if ticket is not None and not ticket.done:
            ticket.cancel()


def _joined(parts: list[Scores]) -> Scores:
    """Several chunks' scores as one chunk's (their texts are joined too)."""
    ids, logprobs, tops = [], [], []
    for part_ids, part_logprobs, part_tops in parts:
        ids += part_ids
        logprobs += part_logprobs
        tops += part_tops
    return ids, logprobs, tops


def _to_stream(ref: weakref.ref, method: str, arg: object) -> None:
    """A ticket's callback to its stream, while the stream lives (a collected one has cancelled its
    request in __del__)."""
    stream = ref()
    if stream is not None:
        getattr(stream, method)(arg)
