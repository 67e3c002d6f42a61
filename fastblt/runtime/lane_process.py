"""A lane in a worker process of its own: a BatchEngine that shares no interpreter lock.

Thread lanes (async_engine.py) overlap one lane's step calls with another's Python, but every
lane's Python between calls (sampling, patch bookkeeping, feeds) and the event loop's request
handling take turns on one GIL. On 2 cores, two one-lane processes of 8 rows each made 4,658 B/s
of greedy `ar` side by side, where one process with two thread lanes of 8 made 3,665: the lock,
not the cores, was the limit, and more cores make it worse. A `ProcessLane` runs the same
BatchEngine in a child process (forked from a zygote where there is one: zygote.py); the parent
keeps the request checks, the event loop and HTTP.

Traffic over one duplex pipe per lane: the parent sends `("submit", id, request, stream,
scores)`, `("cancel", id)`, `("peers", busy)`, `("stats",)` and `("close", cancel)`; the child
answers `("texts", [(id, text, scores or None), ...])` (a turn's streamed chunks, one message per
turn), `("done", id, generation, error)`,
`("stats", BatchStats)` and `("closed",)`. A reader thread in the parent turns them into the
callbacks of the request's Ticket, exactly as a thread lane calls them, so AsyncEngine treats
both kinds alike. The child ignores SIGINT and SIGTERM (a server's process group gets them: the
parent decides when its lanes stop, after the requests in flight) and ends when its pipe closes,
so it never outlives the parent. A child that dies fails the requests it held, and the lane
starts another (after a growing pause while children die young).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import logging
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fastblt.errors import EngineBusy, EngineClosed, FastBltError, InternalError, LaneLost
from fastblt.runtime.batch import BatchEngine, BatchStats, Ticket, check_sizes, sum_stats
from fastblt.runtime.options import Request
from fastblt.runtime.stream import Scores
from fastblt.runtime.wakeups import deferred_wakes
from fastblt.runtime.zygote import Forked, Zygote, set_name
from fastblt.runtime.zygote import available as zygote_available

START_TIMEOUT = 600.0  # seconds a child may take to load (a first export can take a while on a big model)
STATS_TIMEOUT = 5.0  # seconds to wait for a live child's counters before reporting the last ones
CANCEL_GRACE = 2.0  # seconds a closing child has to cancel what it holds (or to exit) before it is killed
YOUNG_S = 30.0  # a child that dies sooner than this is started again only after a pause
MAX_RESTART_DELAY_S = 60.0

log = logging.getLogger("fastblt.lane")


class _Writer:
    """Sends one child's messages on a thread of its own, in order. A child that stops reading
    (stopped, stuck in native code, swapped out) fills the pipe and then blocks this thread, never
    the caller: submit, cancel and peers run on the event loop, and a cancel may come from a
    stream's __del__ in the middle of another send (SimpleQueue.put is reentrant)."""

    def __init__(self, conn: Connection):
        self.conn, self.failed = conn, False
        self.queue: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="fastblt-lane-writer", daemon=True).start()

    def put(self, msg: tuple) -> bool:
        """Queue `msg`; False once the pipe has failed (the child is gone)."""
        if self.failed:
            return False
        self.queue.put(msg)
        return True

    def stop(self) -> None:
        self.queue.put(None)

    def _run(self) -> None:
        while (msg := self.queue.get()) is not None:
            try:
                self.conn.send(msg)
            except (OSError, ValueError, EOFError):
                self.failed = True  # the reader sees the pipe close and fails what the child held
                return


class _RemoteTicket(Ticket):
    """A Ticket whose request runs in a child: cancelling it also tells the child."""

    def __init__(self, lane: ProcessLane, rid: int, *args: Any):
        super().__init__(*args)
        self._lane, self._rid = lane, rid

    def cancel(self) -> None:
        if not self.cancelled and not self.done:
            self._lane._send(("cancel", self._rid))
        super().cancel()


class ProcessLane:
    """One lane (a BatchEngine of `max_batch` rows) in a child process, driven through a pipe.

    Args:
        checkpoint: the checkpoint's path (the child loads it itself).
        backend: the backend's name.
        max_batch, max_queue, max_context: as for BatchEngine.
        load: Generator's loading options for the child (artifacts, threads, cache_dir, device,
            cuda_graphs); the parent has loaded the same checkpoint first, so any export the
            child needs is already in the cache.
        restart: start a new child when one dies (its requests fail either way).

    Call `wait_ready()` before submitting: lanes start in parallel, each loading its sessions.
    """

    def __init__(self, checkpoint: Path, backend: str, max_batch: int, max_queue: int,
                 max_context: int | None, load: dict[str, Any], restart: bool = True,
                 zygote: Zygote | None = None):  # fmt: skip
        check_sizes(max_batch, max_queue)
        self._zygote = zygote
        self.max_batch, self.max_queue = max_batch, max_queue
        self._args = (str(checkpoint), backend, max_batch, max_queue, max_context, load)
        self._restart = restart
        self.restarts = 0  # children started again after one died
        self._writer: _Writer | None = None
        self._tickets: dict[int, _RemoteTicket] = {}
        self._lock = threading.Lock()  # guards _tickets, _closing and _lost
        self._ids = itertools.count()
        self._closing = False
        self._base = BatchStats(calls={}, rows={})  # the counters of children that died
        self._stats = BatchStats(calls={}, rows={})  # the live child's, as last reported
        self._stats_wanted = threading.Lock()  # one stats round trip at a time
        self._stats_event = threading.Event()  # set: the child answered the last stats question
        self._stats_event.set()
        self._closed = threading.Event()
        self._lost: str | None = "starting"  # why no child serves now (None: one does)
        self._peers_busy = False  # whether the other lanes hold requests, as last told to the child
        self.on_change: Callable[[], None] | None = None  # called when a request leaves the lane
        self._spawn()

    def _spawn(self) -> None:
        """Start a child: forked from the zygote when there is one (zygote.py), else a fresh
        interpreter. Never a fork of this process (a forked copy of onnxruntime's threads would
        hang) and not multiprocessing's spawn (which imports the caller's __main__ again: a script
        without a main guard would start its engine in every lane)."""
        ours, theirs = socket.socketpair()
        with theirs:
            fd = theirs.fileno()
            self._proc = self._fork(fd) or subprocess.Popen(
                [sys.executable, "-c", "from fastblt.runtime.lane_process import main; main()", str(fd)],
                pass_fds=(fd,), stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self._conn = Connection(ours.detach())
        if self._writer is not None:
            self._writer.stop()
        self._writer = _Writer(self._conn)
        self._writer.put(self._args)
        self._started = time.monotonic()

    def _fork(self, fd: int) -> Forked | None:
        if self._zygote is None:
            return None
        try:
            return self._zygote.fork(fd)
        except OSError as e:
            log.warning("fastblt lane %s: %s; starting a fresh interpreter instead", id(self), e)
            self._zygote = None
            return None

    # ------------------------------------------------------------------ lifecycle
    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait for the child to load; raise its error (or InternalError) if it could not."""
        self._ready(timeout)
        ref = weakref.ref(self)
        atexit.register(lambda: (lane := ref()) is not None and lane.close(10, cancel=True))

    def _ready(self, timeout: float, restarted: bool = False) -> None:
        if not self._conn.poll(timeout):
            self._kill()
            raise InternalError(f"lane process: not ready after {timeout:.0f} s")
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            self._kill()
            raise InternalError(f"lane process: exited while loading (exit code {self._exit_code()})") from None
        if msg[0] != "ready":
            self._kill()
            raise msg[1]
        with self._lock:
            self.restarts += restarted  # counted before the lane reads as alive again
            self._stats, self._lost = msg[1], None
            self._closed.clear()
        threading.Thread(target=self._read, args=(self._conn,), name="fastblt-lane-reader", daemon=True).start()
        if self._peers_busy:  # a child started again begins alone
            self._send(("peers", True))

    def tell_peers(self, busy: bool) -> None:
        """Tell the child whether the other lanes hold requests (it runs its global step on every
        core only while they do not: `OrtBackend.widen_global`)."""
        if busy != self._peers_busy:
            self._peers_busy = busy
            self._send(("peers", busy))

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def closed(self) -> bool:
        """Whether it takes no more requests (closing, or its process is gone)."""
        return self._closing or self._lost is not None

    @property
    def alive(self) -> bool:
        """Whether its process still serves (it may be closing)."""
        return self._lost is None

    @property
    def load(self) -> int:
        """Requests this lane holds (decoding or queued): what AsyncEngine balances lanes by."""
        return len(self._tickets)

    def ahead(self, priority: int) -> int:
        """Requests this lane holds that a new one of `priority` would not go before (its number or
        lower): what AsyncEngine places a request by."""
        with self._lock:
            return sum(t.request.priority <= priority for t in self._tickets.values())

    @property
    def stats(self) -> BatchStats:
        """The counters now: the live child's (the last ones known when it does not answer) added
        to those of the children before it, so they only grow."""
        with self._stats_wanted:
            # a child that left the last question unanswered is not asked (and waited for) again
            if self._lost is None and not self._closed.is_set() and self._stats_event.is_set():
                self._stats_event.clear()
                if self._send(("stats",)):
                    self._stats_event.wait(STATS_TIMEOUT)
            return sum_stats([self._base, self._stats])

    def submit(self, request: Request, on_text: Callable[[str], None] | None = None,
               on_done: Callable[[Ticket], None] | None = None,
               on_scores: Callable[[Scores], None] | None = None) -> Ticket:  # fmt: skip
        """Queue a checked request in the child; as BatchEngine.submit (EngineBusy, EngineClosed)."""
        rid = next(self._ids)
        ticket = _RemoteTicket(self, rid, request, on_text, on_done, on_scores)
        with self._lock:
            if self._closing or self._lost is not None:
                if self._lost not in (None, "closed") and self._restart and not self._closing:  # restarting
                    raise LaneLost(f"engine: {self._lost}; it takes requests again once its next one is up")
                why = "closing" if self._lost is None else self._lost
                raise EngineClosed(f"engine: {why}; it takes no new requests")
            waiting = len(self._tickets) - self.max_batch
            if waiting >= self.max_queue:
                raise EngineBusy(f"engine: {waiting} requests already wait for a row (max_queue {self.max_queue})")
            self._tickets[rid] = ticket
        if not self._send(("submit", rid, request, on_text is not None, on_scores is not None)):
            self._lost_child()
        return ticket

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait for the child to finish what it holds after `close`; whether it has."""
        return self._closed.wait(timeout)

    def close(self, timeout: float | None = None, cancel: bool = False) -> None:
        """Take no new requests; the child finishes (or, with `cancel`, cancels) what it holds,
        then exits. `timeout` bounds the wait (0: return at once); a child still running after it
        is cancelled, given CANCEL_GRACE seconds, then killed, so a close takes at most about
        timeout + CANCEL_GRACE even when the child no longer reads its pipe."""
        with self._lock:
            first = not self._closing
            self._closing = True
        if first or cancel:
            self._send(("close", cancel))
        if timeout == 0:
            return
        if not self._closed.wait(timeout) and not cancel:
            self._send(("close", True))
            self._closed.wait(CANCEL_GRACE)
        try:  # a child that said "closed" exits as soon as its sessions are released
            self._proc.wait(CANCEL_GRACE if self._closed.is_set() else 0)
        except subprocess.TimeoutExpired:
            self._kill()
        if self._writer is not None:
            self._writer.stop()
        self._conn.close()

    # ------------------------------------------------------------------ the pipe
    def _send(self, msg: tuple) -> bool:
        """Queue a message to the child (it never blocks: `_Writer`); False when it is gone."""
        return self._writer is not None and self._writer.put(msg)

    def _read(self, conn: Connection) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError, pickle.UnpicklingError):
                self._lost_child()
                return
            kind = msg[0]
            if kind == "texts":
                with deferred_wakes():
                    for rid, text, scores in msg[1]:
                        ticket = self._tickets.get(rid)
                        if ticket is not None and ticket.on_text is not None:
                            try:
                                if scores is not None and ticket.on_scores is not None:
                                    ticket.on_scores(scores)
                                ticket.on_text(text)
                            except Exception:  # a listener that fails has gone: stop the request
                                ticket.cancel()
            elif kind == "done":
                with self._lock:
                    ticket = self._tickets.pop(msg[1], None)
                if ticket is not None:
                    with contextlib.suppress(Exception):  # a caller's callback must not stop the lane
                        ticket._finish(msg[2], msg[3])
                    self._changed()
            elif kind == "stats":
                self._stats = msg[1]
                self._stats_event.set()
            elif kind == "closed":
                self._closed.set()
                self._lost_child("closed")
                return

    def _lost_child(self, why: str | None = None) -> None:
        """The child is gone: fail what it held (it cannot finish them), and start another unless
        the lane is closing."""
        why = why or f"its lane process exited (exit code {self._exit_code()})"
        with self._lock:
            first = self._lost is None
            if first:
                self._lost = why
            held, self._tickets = list(self._tickets.values()), {}
            revive = first and why != "closed" and self._restart and not self._closing
        lost = EngineClosed if self._lost == "closed" else LaneLost  # closed: the engine closes it
        error = lost(f"engine: {self._lost} before the request finished")
        for ticket in held:
            with contextlib.suppress(Exception):
                ticket._finish(None, error)
        if held:
            self._changed()
        if first:
            self._stats.active = self._stats.queued = self._stats.prompt_cache_bytes = 0
            self._stats.failed += len(held)
            self._base, self._stats = sum_stats([self._base, self._stats]), BatchStats(calls={}, rows={})
        self._stats_event.set()
        self._closed.set()
        if revive:
            lived = time.monotonic() - self._started
            threading.Thread(target=self._revive, args=(lived,), name="fastblt-lane-restart", daemon=True).start()

    def _revive(self, lived: float) -> None:
        """Start a new child for a lane whose child died, after a pause that doubles while
        children die young (a request that kills its lane must not make it spin)."""
        delay = 0.0 if lived > YOUNG_S else 1.0
        while True:
            time.sleep(delay)
            if self._closing:
                return
            log.warning("fastblt lane %s: its process died (%s); starting another", id(self), self._lost)
            try:
                self._spawn()
                self._ready(START_TIMEOUT, restarted=True)
            except Exception as e:
                log.warning("fastblt lane %s: could not start its process again: %s", id(self), e)
                delay = min(max(2 * delay, 1.0), MAX_RESTART_DELAY_S)
                continue
            if self._closing:  # closed while the child loaded: it gets the same close
                self._send(("close", True))
            return

    def _changed(self) -> None:
        if self.on_change is not None:
            with contextlib.suppress(Exception):
                self.on_change()

    def _exit_code(self) -> int | None:
        """The child's exit code (a moment after its pipe closed it may not be reaped yet)."""
        try:
            return self._proc.wait(1)
        except subprocess.TimeoutExpired:
            return None

    def _kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):  # killed; reaping it is not ours to wait for
                self._proc.wait(5)


# ---------------------------------------------------------------------- the child
PRELOAD = ("torch", "numpy", "fastblt.runtime.lane_process", "fastblt.runtime.generator",
           "fastblt.engines.ort_backend")  # a zygote's imports: what every worker imports but onnxruntime  # fmt: skip


def start_zygote() -> Zygote | None:
    """A zygote to fork this engine's workers from, or None where there can be none or the
    environment says FASTBLT_ZYGOTE=0 (the workers then start as fresh interpreters)."""
    if not zygote_available() or os.environ.get("FASTBLT_ZYGOTE", "1") == "0":
        return None
    try:
        return Zygote("fastblt.runtime.lane_process:serve", PRELOAD, "fastblt-lane")
    except OSError as e:
        log.warning("fastblt lanes: %s; workers start as fresh interpreters", e)
        return None


def main() -> None:
    """A fresh interpreter's entry point: its end of the pipe is the file descriptor in argv[1]."""
    set_name("fastblt-lane")
    serve(int(sys.argv[1]))


def serve(fd: int) -> None:
    """A worker's life on its end of the pipe: load as the parent says, serve until closed."""
    conn = Connection(fd)
    checkpoint, *args = conn.recv()
    _child(conn, Path(checkpoint), *args)


def _child(conn: Connection, checkpoint: Path, backend: str, max_batch: int, max_queue: int,
           max_context: int | None, load: dict[str, Any]) -> None:  # fmt: skip
    """The child's main thread: load, then serve the parent's messages until told to close or the
    pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out = _Outbox(conn)
    alone = [True]  # no other lane holds a request (the parent says when that changes)
    try:
        gen, batch = _load(checkpoint, backend, max_batch, max_queue, max_context, load, out, alone)
    except BaseException as e:  # noqa: BLE001 (the parent raises it)
        out.send(("failed", _portable(e)))
        return
    out.send(("ready", batch.stats))
    if _serve(conn, batch, out, alone):
        gen.close()
        out.send(("closed",))  # a blocking write: in the socket's buffer before the process ends


def _load(checkpoint: Path, backend: str, max_batch: int, max_queue: int, max_context: int | None,
          load: dict[str, Any], out: _Outbox, alone: list[bool]) -> tuple[Any, BatchEngine]:  # fmt: skip
    """The lane's Generator (its backend and sessions) and BatchEngine."""
    import torch

    from fastblt.runtime.generator import Generator

    wide, global_threads = load.pop("wide_global", None), load.pop("global_threads", None)
    shared = load.pop("prompt_share", None)  # (directory, lane): the engine's snapshot files
    if load.get("threads"):  # torch on the host side too: the lane's cores, not the machine's
        torch.set_num_threads(load["threads"])
    gen = Generator(checkpoint, backend, max_context=max_context, **load)
    gen.model = None  # type: ignore[assignment]  # the graphs hold the weights; the torch copy would cost each worker its size
    _give_back_freed_memory()
    backend_ = gen.engine.backend
    if global_threads is not None and hasattr(backend_, "set_global_threads"):
        backend_.set_global_threads(global_threads)
    if wide is not None and hasattr(backend_, "widen_global"):
        backend_.widen_global(wide, lambda: alone[0])
    if shared is not None and gen.engine.prompts.budget and gen.engine.device.type == "cpu":
        from fastblt.runtime.prompt_share import SnapshotFiles

        gen.engine.prompts.shared = SnapshotFiles(*shared)
    return gen, BatchEngine(gen.engine, max_batch, max_queue, max_context, gen.backend_name, gen.params, out.flush)


def _give_back_freed_memory() -> None:
    """glibc keeps small freed blocks (the torch model's) for reuse; a worker will not reuse them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _serve(conn: Connection, batch: BatchEngine, out: _Outbox, alone: list[bool]) -> bool:
    """The parent's messages, until the batch has closed (True) or the pipe has (False: the parent
    is gone, and nobody waits for the requests, which are cancelled)."""
    tickets: weakref.WeakValueDictionary[int, Ticket] = weakref.WeakValueDictionary()
    closing = False
    while not (closing and not batch.alive):
        try:
            if closing and not conn.poll(0.05):
                continue
            msg = conn.recv()
        except (EOFError, OSError):
            batch.close(10, cancel=True)
            return False
        kind = msg[0]
        if kind == "submit":
            _, rid, request, streamed, scored = msg
            on_text = (lambda text, rid=rid: out.text(rid, text)) if streamed else None
            on_scores = (lambda scores, rid=rid: out.scores(rid, scores)) if scored else None
            try:
                tickets[rid] = batch.submit(request, on_text=on_text, on_done=lambda t, rid=rid: out.done(rid, t),
                                            on_scores=on_scores)  # fmt: skip
            except FastBltError as e:
                out.send(("done", rid, None, e))
        elif kind == "peers":
            alone[0] = not msg[1]
        elif kind == "cancel":
            ticket = tickets.get(msg[1])
            if ticket is not None:
                ticket.cancel()
        elif kind == "stats":
            with batch._cv:
                snap = sum_stats([batch.stats])
            out.send(("stats", snap))
        elif kind == "close":
            closing = True
            batch.close(0, cancel=msg[1])
    return True


class _Outbox:
    """The child's side of the pipe: sends under a lock (the main thread and the batch thread both
    send), and a turn's streamed chunks as one message."""

    def __init__(self, conn: Connection):
        self.conn, self.lock = conn, threading.Lock()
        self.texts: list[tuple[int, str, Scores | None]] = []  # the batch thread's own list
        self.pending: dict[int, Scores] = {}  # a chunk's scores, until its text comes

    def send(self, msg: tuple) -> None:
        try:
            with self.lock:
                self.conn.send(msg)
        except (OSError, ValueError):
            pass  # the parent is gone: the main thread sees the pipe close

    def scores(self, rid: int, scores: Scores) -> None:
        self.pending[rid] = scores

    def text(self, rid: int, text: str) -> None:
        self.texts.append((rid, text, self.pending.pop(rid, None)))

    def flush(self) -> None:
        """After each turn (the batch's on_turn), and before a request's end."""
        if self.texts:
            self.send(("texts", self.texts[:]))
            self.texts.clear()

    def done(self, rid: int, ticket: Ticket) -> None:
        self.flush()
        self.send(("done", rid, ticket.generation, _portable(ticket.error)))


def _portable(error: BaseException | None) -> BaseException | None:
    """The error itself when it crosses the pipe intact, else an InternalError naming it."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return InternalError(f"lane process: {error!r}")
