"""Continuous batching: up to `max_batch` sequences decoding at once, sharing every step call.

Each request runs the same plan a Generator runs alone (loops.generate: prefill, then its mode's
loop), on a SequenceState whose ring caches are one row of the batch's RowCaches. A plan yields
its step calls; the batch loop (one thread) collects the pending call of every live sequence and
runs them step by step:

- Steps are taken in a cycle (encoder, entropy, global, decoder, diffusion head): each turn runs
  every pending call of the next step that has any, so sequences that do the same work stay in
  step with each other (ar rows all encode, then all patch, ...) and no step waits more than a
  cycle.
- A cohort (the requests of one mode and draft length) starts its rounds together: a sequence
  that ends a round parks until every sequence of its cohort has (one still in its prefill holds
  up none), so blt-s rows draft and verify in the same turns instead of drifting apart.
- Calls of one step are grouped into backend calls: the same number of new positions (a ring
  step's rows cannot be padded: padding would write a sequence's ring) and consecutive rows (one
  contiguous slice of every ring buffer). Live sequences hold rows 0..n-1, each cohort in one
  block; joining or leaving moves at most one row per later block. The global step, whose cache
  grows per sequence, gathers its rows' caches, so it takes any rows: one call per power-of-two
  bin of patch counts, padded inside the scratch; rows without a closed patch are not in it.
- A cohort of greedy blt-s or blt-dv requests drafts a round from their contexts
  (loops.draft_context) only when every row starting the round can; their bytes are the same
  either way.
- Requests of any mode and sampling settings share a batch: a call's rows only need the same
  step and size. Each request keeps its own RNG, stop strings and output.
- A request admitted while another prefills the same prompt (n choices of one completion) waits,
  then starts from a copy of that prefill (SequenceState.copy_from): rows compute as they do
  alone, so the copy is what its own prefill would have made.
- A request whose prompt was committed before on this engine loads a snapshot of it
  (prompt_cache.py, the engine's `prompts`) in its own plan, as a Generator's call does.

Requests join between turns (by `priority`, lower first, then first in, first out, while a row
is free) and leave as soon as their plan ends, their stop condition is met, they are cancelled or
they fail; requests beyond `max_batch + max_queue` are refused (`EngineBusy`). A request waiting
for a row takes one from a running request of a lower priority (a higher number) at the end of
that one's round: the latter's ring row is copied aside and it waits at the head of its priority,
then resumes where it stopped (its own state, plan and caches kept: the same bytes). Output is exact
per request: the step graphs compute each row as they compute it alone, so a request's bytes do
not depend on what else is in the batch (tests/runtime/test_batch.py, benchmarks/batch_scaling.py;
docs/serving.md).
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from fastblt.errors import Cancelled, EngineBusy, EngineClosed, FastBltError, InputError, InternalError
from fastblt.export.spec import STEPS, TORCH_DTYPES, state_dtype
from fastblt.runtime import courtesy, loops
from fastblt.runtime.caches import RowCaches
from fastblt.runtime.calls import Plan, StepCall, StepRunner
from fastblt.runtime.engine import Engine
from fastblt.runtime.generator import Generation, generation, new_run
from fastblt.runtime.options import Request, check_fit, checked, draft_length
from fastblt.runtime.prompt_cache import PromptCache
from fastblt.runtime.state import SequenceState
from fastblt.runtime.stream import Output, Scores, TextChunker
from fastblt.runtime.wakeups import deferred_wakes

CYCLE = ("encoder", "entropy", "global", "decoder", "decoder_block")  # the order sequences take steps in
DEFAULT_MAX_BATCH = 16  # past 16 rows a CPU step call gains little more per row (batch_scaling.md)
assert sorted(CYCLE) == sorted(STEPS)


@dataclass
class BatchStats:
    """What the batch loop has done so far (monotonic counters) and holds now."""

    active: int = 0  # sequences holding a row
    queued: int = 0  # requests waiting for one
    turns: int = 0  # steps taken
    calls: dict[str, int] = field(default_factory=dict)  # backend calls per step
    rows: dict[str, int] = field(default_factory=dict)  # sequences served per step (sum over its calls)
    admitted: int = 0
    preempted: int = 0  # rows given up to a waiting request of a higher priority (each resumes later)
    finished: int = 0  # ended normally (eos, stop string, max_bytes)
    cancelled: int = 0
    failed: int = 0
    generated: int = 0  # ids generated by every request that ended, finished or not (work done)
    shared_prefills: int = 0  # requests that took a copy of another's prefill instead of their own
    prompt_hits: int = 0  # requests that loaded a prompt snapshot (prompt_cache.py)
    prompt_hit_ids: int = 0  # prompt ids those loaded instead of committing them
    prompt_shared_hits: int = 0  # of the hits, snapshots another lane kept (prompt_share.py)
    prompt_cache_bytes: int = 0  # what the snapshots hold now


def sum_stats(stats: list[BatchStats]) -> BatchStats:
    """Several batch loops' counters as one new BatchStats (a snapshot, also for one lane)."""
    out = BatchStats(calls={}, rows={})
    for s in stats:
        for name in ("active", "queued", "turns", "admitted", "preempted", "finished", "cancelled", "failed",
                     "generated", "shared_prefills", "prompt_hits", "prompt_hit_ids", "prompt_shared_hits",
                     "prompt_cache_bytes"):  # fmt: skip
            setattr(out, name, getattr(out, name) + getattr(s, name))
        for step in s.calls:
            out.calls[step] = out.calls.get(step, 0) + s.calls[step]
            out.rows[step] = out.rows.get(step, 0) + s.rows[step]
    return out


class Ticket:
    """One submitted request: wait for it, cancel it, and (with `on_text`) stream it.

    Callbacks run on the batch loop's thread: keep them short (hand the value to your own thread
    or event loop), and never block in them.
    """

    def __init__(self, request: Request, on_text: Callable[[str], None] | None,
                 on_done: Callable[[Ticket], None] | None,
                 on_scores: Callable[[Scores], None] | None = None):  # fmt: skip
        self.request = request
        self.on_text, self.on_done = on_text, on_done
        # with option logprobs: each streamed chunk's scores, before its text; with prompt_logprobs
        # too, the first chunk's begin with the prompt's (an entry per prompt id after BOS)
        self.on_scores = on_scores
        self.generation: Generation | None = None
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()
        self._cancel = threading.Event()
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        """Whether it was cancelled before it finished."""
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop this request: it leaves the batch (or the queue) before the next step is taken.
        A request that has finished stays finished."""
        if not self._done.is_set():
            self._cancel.set()

    def result(self, timeout: float | None = None) -> Generation:
        """Wait for the Generation; raises the request's error, `Cancelled`, or TimeoutError."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request not finished after {timeout} s")
        if self.error is not None:
            raise self.error
        assert self.generation is not None
        return self.generation

    def _finish(self, generation: Generation | None, error: BaseException | None) -> None:
        self.generation, self.error = generation, error
        self._done.set()
        if self.on_done is not None:
            self.on_done(self)


class _Sequence:
    """A request holding a row: its state, its run, its plan and the step call it waits on."""

    def __init__(self, ticket: Ticket, state: SequenceState, max_step: int, prompts: PromptCache,
                 leader: _Sequence | None = None):  # fmt: skip
        req = ticket.request
        self.ticket, self.state, self.prompts = ticket, state, prompts
        o = req.opts
        self.run = new_run(state, o, Output(o.max_bytes, o.stop, o.stop_on_eos, o.logprobs, o.prompt_logprobs))
        self.chunk = o.prefill_chunk or max_step
        # a request admitted while another of the same prompt prefills it waits for a copy of that
        # prefill (`take_prompt`) instead of running its own: n choices of one prompt prefill once
        self.leader = leader
        if leader is None:
            self.plan = loops.generate(self.run, list(req.ids), self.chunk, prompts)
        else:  # its wait counts as its prefill
            self.plan, self.run.prefill["t_start"] = None, time.perf_counter()
        self.chunker = TextChunker(req.opts.stop) if ticket.on_text is not None else None
        self.prompt_scored = o.prompt_logprobs is None  # its scores went out with the first chunk's
        self.cohort = req.opts.mode, draft_length(req.opts, max_step)
        self.pending: StepCall | None = None
        self.order = 0  # when it was admitted (the batch's count of admissions)
        self.aside: list[Tensor] | None = None  # its ring row while it waits, preempted
        self.parked = False  # at the end of a round, waiting for its cohort
        self.joined = False  # has ended a round (a prefilling sequence holds up no cohort)
        self.ended = False

    @property
    def request(self) -> Request:
        return self.ticket.request

    @property
    def cancelled(self) -> bool:
        return self.ticket.cancelled

    def can_lead(self, ticket: Ticket) -> bool:
        """Whether the request of `ticket` may take a copy of this sequence's prefill: this one
        prefills the same prompt in the same chunks (and scores it alike), and has not finished."""
        req, mine = ticket.request, self.ticket.request
        chunk = req.opts.prefill_chunk or self.state.max_step
        return (
            self.leader is None and self.run.prompt_logits is None and not self.ended and not self.ticket.cancelled
            and chunk == self.chunk and req.opts.prompt_logprobs == mine.opts.prompt_logprobs and req.ids == mine.ids
        )  # fmt: skip

    def take_prompt(self) -> None:
        """Decode from a copy of the leader's prefill, taken when the plan is next advanced: at once,
        in the turn the leader committed the prompt (its state is still at the prompt's end: its
        first step call has not run). A copy that fails (out of memory) fails this request alone."""
        self.plan, self.leader = self._from_copy(self.leader), None

    def _from_copy(self, leader: _Sequence) -> Plan[None]:
        out = self.run.out
        self.state.copy_from(leader.state)
        if out.prompt_logprobs is not None:
            out.prompt_logprobs += leader.run.out.prompt_logprobs
            out.prompt_top_logprobs += [dict(t) for t in leader.run.out.prompt_top_logprobs]
        yield from loops.resume(self.run, leader.run.prompt_logits.copy())

    def prefill_alone(self) -> None:
        """The leader left before its prefill ended: run this request's own."""
        self.plan = loops.generate(self.run, list(self.ticket.request.ids), self.chunk, self.prompts)
        self.leader = None

    def advance(self, outputs: dict | None) -> None:
        """Run the plan up to its next step call, or to the end of a round (streaming what the
        round verified; the sequence then parks until its cohort is at the end of a round too)."""
        try:
            item = self.plan.send(outputs)
        except StopIteration:
            self.pending, self.ended = None, True
            return
        self.pending = item
        if item is None:
            self.parked = self.joined = True
            self._stream()

    def _stream(self, final: bool = False) -> None:
        if self.chunker is not None:
            text = self.chunker.take(self.run.out.data, final=final)
            if text:
                try:
                    if self.ticket.on_scores is not None and self.run.out.logprobs is not None:
                        self.ticket.on_scores(self._scores())
                    self.ticket.on_text(text)
                except Exception:  # a listener that fails has gone: stop the request, not the batch
                    self.ticket.cancel()

    def _scores(self) -> Scores:
        """The scores of the chunk about to go out (the first one's led by the prompt's)."""
        out = self.run.out
        ids, logprobs, tops = out.new_scores(self.chunker.sent)
        if not self.prompt_scored:
            self.prompt_scored = True
            prompt = list(self.ticket.request.ids[1:])
            ids, logprobs, tops = prompt + ids, out.prompt_logprobs + logprobs, out.prompt_top_logprobs + tops
        return ids, logprobs, tops


def check_sizes(max_batch: int, max_queue: int) -> None:
    """InputError naming `max_batch` (an int >= 1) or `max_queue` (an int >= 0) when it is not one."""
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise InputError(f"max_batch: expected an int >= 1, got {max_batch!r}")
    if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 0:
        raise InputError(f"max_queue: expected an int >= 0, got {max_queue!r}")


class BatchEngine:
    """Runs requests in batches over one Engine, on a thread of its own (see the module docstring).

    Args:
        engine: the backend and config (a Generator's `.engine`, or `open_engine(...)`).
        max_batch: sequences decoding at once (rows of every batched step call); None: 16, or
            fewer when the backend's engines take fewer rows per call (trt).
        max_queue: requests waiting for a row beyond which `submit` raises EngineBusy.
        max_context: optional limit on ids (prompt + output) per request, as Generator's.
        backend_name, params: what each Generation's stats report (Generator's values).
        on_turn: called on the loop's thread after each turn (a lane process sends the turn's
            streamed text to its parent then, as one message).
    """

    def __init__(
        self,
        engine: Engine,
        max_batch: int | None = None,
        max_queue: int = 256,
        max_context: int | None = None,
        backend_name: str = "",
        params: dict[str, int] | None = None,
        on_turn: Callable[[], None] | None = None,
    ):
        backend, config = engine.backend, engine.config
        if max_batch is None:
            max_batch = min(DEFAULT_MAX_BATCH, backend.max_rows or DEFAULT_MAX_BATCH)
        check_sizes(max_batch, max_queue)
        if backend.max_rows is not None and max_batch > backend.max_rows:
            raise InputError(
                f"max_batch {max_batch}: the {backend.name} backend's engines take at most {backend.max_rows} rows "
                f"per call; lower max_batch or rebuild them with `fastblt build --max-batch {max_batch}`"
            )
        self.engine, self.config = engine, config
        self.max_batch, self.max_queue, self.max_context = max_batch, max_queue, max_context
        self.backend_name, self.params = backend_name or backend.name, params or {}
        self.rows = RowCaches(
            backend.specs, config, max_batch, TORCH_DTYPES[state_dtype(backend.specs)], backend.device
        )
        self.runner = StepRunner(backend, max_batch, engine.locks)
        self.live: list[_Sequence] = []  # row i holds live[i]
        self.queue: deque[Ticket | _Sequence] = deque()  # waiting for a row: new, or preempted
        self.stats = BatchStats(calls=dict.fromkeys(STEPS, 0), rows=dict.fromkeys(STEPS, 0))
        self._idle: list[SequenceState] = []
        self._cv = threading.Condition()
        self._closing = False
        self._cycle = 0
        self._on_turn = on_turn
        self._thread = threading.Thread(target=self._loop, name="fastblt-batch", daemon=True)
        self._thread.start()
        ref = weakref.ref(self)
        atexit.register(lambda: (e := ref()) is not None and e.close(10, cancel=True))  # no step at interpreter exit

    # ------------------------------------------------------------------ requests
    def submit(self, request: Request, on_text: Callable[[str], None] | None = None,
               on_done: Callable[[Ticket], None] | None = None,
               on_scores: Callable[[Scores], None] | None = None) -> Ticket:  # fmt: skip
        """Queue a checked request (make_request); returns its Ticket at once. `on_text` gets the
        text as it is verified; `on_scores` (option logprobs) each such chunk's scores first.

        Raises InputError when it cannot fit the graphs or `max_context`, EngineBusy when the queue
        is full, EngineClosed once `close` began.
        """
        request = checked(request, self.config)
        check_fit(request, self.engine.max_step, self.max_context)
        ticket = Ticket(request, on_text, on_done, on_scores)
        with self._cv:
            if self._closing:
                raise EngineClosed("engine: closing; it takes no new requests")
            waiting = len(self.live) + len(self.queue) - self.max_batch  # beyond the rows there are
            if waiting >= self.max_queue:
                raise EngineBusy(f"engine: {waiting} requests already wait for a row (max_queue {self.max_queue})")
            # behind every waiting request of its priority or a lower number, ahead of the rest
            at = next((i for i, t in enumerate(self.queue) if t.request.priority > request.priority), len(self.queue))
            self.queue.insert(at, ticket)
            self.stats.queued = len(self.queue)
            self._cv.notify()
        return ticket

    @property
    def closed(self) -> bool:
        """Whether it takes no more requests."""
        return self._closing

    @property
    def alive(self) -> bool:
        """Whether its loop still runs."""
        return self._thread.is_alive()

    @property
    def load(self) -> int:
        """Requests this batch holds (decoding or queued)."""
        return len(self.live) + len(self.queue)

    def ahead(self, priority: int) -> int:
        """Requests this batch holds that a new one of `priority` would not go before (its number
        or lower), decoding or queued."""
        with self._cv:
            held = [*self.queue, *(seq for seq in self.live if seq is not None)]
            return sum(e.request.priority <= priority for e in held)

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait for the loop to finish what it holds after `close`; whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self, timeout: float | None = None, cancel: bool = False) -> None:
        """Take no new requests; finish the ones admitted or queued (or, with `cancel`, cancel
        them), then stop the loop. `timeout` bounds the wait: what is still running after it is
        cancelled (0: only stop taking requests, and return at once)."""
        with self._cv:
            self._closing = True
            if cancel:
                held = [e.ticket if isinstance(e, _Sequence) else e for e in self.queue]
                for ticket in [*held, *(seq.ticket for seq in self.live if seq is not None)]:
                    ticket.cancel()
            self._cv.notify()
        if timeout == 0:
            return
        self._thread.join(timeout)
        if self._thread.is_alive() and not cancel:
            self.close(10, cancel=True)

    def __enter__(self) -> BatchEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self.live and not self.queue and not self._closing:
                    self._cv.wait()
                if self._closing and not self.live and not self.queue:
                    return
            try:
                with deferred_wakes(), courtesy.serving():  # one wake per listening event loop; compiles yield
                    with self._cv:
                        self._admit()
                    self._drop_cancelled()
                    self._resume_cohorts()
                    self._turn()
                    self._follow()
                    self._retire()
            except Exception as e:  # a bug of the batch itself: fail what it holds, keep serving
                self._fail_all(InternalError(f"batch engine: {e!r}"))
            if self._on_turn is not None:
                with contextlib.suppress(Exception):  # a caller's callback must not stop the batch
                    self._on_turn()

    def _fail_all(self, error: Exception) -> None:
        with self._cv:
            held, self.live = [seq for seq in self.live if seq is not None], []
            for seq in held:
                self.stats.failed += 1
                self.stats.generated += len(seq.run.out.ids)
                self._end(seq.ticket, None, error)
                seq.state.reset()
            self.stats.active = 0

    def _admit(self) -> None:
        """End the waiting requests cancelled since the last turn (one whose caller gave up keeps
        no place in the queue, where it would count against max_queue until a row freed), then
        give free rows to the rest (caller holds the lock)."""
        if any(entry.cancelled for entry in self.queue):
            waiting: deque[Ticket | _Sequence] = deque()
            for entry in self.queue:
                if entry.cancelled:
                    self._end_queued(entry)
                else:
                    waiting.append(entry)
            self.queue = waiting
        while self.queue and (len(self.live) < self.max_batch or self._preempt(self.queue[0].request.priority)):
            entry = self.queue.popleft()
            if entry.cancelled:  # since the sweep above
                self._end_queued(entry)
                continue
            if isinstance(entry, _Sequence):
                self._place(entry)
                self.rows.load_row(entry.state.row, entry.aside)
                entry.aside = None
                continue
            ticket = entry
            try:
                state = self._idle.pop() if self._idle else None
                if state is None:
                    state = SequenceState(self.engine.backend, self.config, rows=self.rows, row=len(self.live))
                state.reset()
                state.reset_counters()
                leader = next((seq for seq in self.live if seq.can_lead(ticket)), None)
                seq = _Sequence(ticket, state, self.engine.max_step, self.engine.prompts, leader)
            except Exception as e:  # its state could not be made (out of memory): it alone fails
                self.stats.failed += 1
                self._end(ticket, None, e if isinstance(e, FastBltError) else InternalError(f"request failed: {e!r}"))
                continue
            self._place(seq)
            self.stats.admitted += 1
            seq.order = self.stats.admitted
            if leader is None:
                self._advance(seq, None)
        self.stats.queued, self.stats.active = len(self.queue), len(self.live)

    def _preempt(self, priority: int) -> bool:
        """Give a waiting request of `priority` a row: that of the running request of the lowest
        priority below it (the latest admitted of those) at the end of its round, which waits at the
        head of its priority with its ring row copied aside (its other caches are its own). False
        when no such request is at a round's end (or one leads another's prefill)."""
        leading = {id(seq.leader) for seq in self.live if seq.leader is not None}
        victims = [seq for seq in self.live if seq.parked and not seq.ended and not seq.cancelled
                   and seq.request.priority > priority and id(seq) not in leading]  # fmt: skip
        if not victims:
            return False
        seq = max(victims, key=lambda v: (v.request.priority, v.order))
        seq.aside = [t.clone() for t in self.rows.row(seq.state.row)]
        self._vacate(seq.state.row)
        at = next((i for i, e in enumerate(self.queue) if e.request.priority >= seq.request.priority), len(self.queue))
        self.queue.insert(at, seq)
        self.stats.preempted += 1
        return True

    def _end_queued(self, entry: Ticket | _Sequence) -> None:
        if isinstance(entry, _Sequence):  # preempted, then cancelled while it waited
            self._finish(entry)
            return
        ticket = entry
        self.stats.cancelled += 1
        self._end(ticket, None, Cancelled("request cancelled while queued"))

    def _advance(self, seq: _Sequence, outputs: dict | None) -> None:
        try:
            seq.advance(outputs)
        except Exception as e:  # a request's own failure (e.g. past the position limit) ends only it
            seq.pending, seq.ended = None, True
            seq.ticket.error = e if isinstance(e, FastBltError) else InternalError(f"request failed: {e!r}")

    def _drop_cancelled(self) -> None:
        for seq in self.live:
            if seq.ticket.cancelled and not seq.ended:
                seq.pending, seq.ended = None, True

    def _resume_cohorts(self) -> None:
        """Resume the parked sequences of every cohort (same mode and k) none of whose joined
        members is still inside a round: a cohort starts its rounds together, so its sequences
        take the same steps at the same turns and share every call. Its greedy blt-s / blt-dv rows
        draft a round from their contexts only when all of them can (one would otherwise finish
        early and wait for the others' drafts)."""
        busy = {seq.cohort for seq in self.live if seq.joined and not seq.parked and not seq.ended}
        starting = [seq for seq in self.live if seq.parked and seq.cohort not in busy and not seq.ended]
        ready: dict[tuple[str, int], bool] = {}  # per cohort: every row starting a round can draft from its context
        for seq in starting:
            ready[seq.cohort] = ready.get(seq.cohort, True) and loops.context_ready(seq.run)
        for seq in starting:
            seq.parked = False
            seq.run.lookup = ready[seq.cohort]
            self._advance(seq, None)

    def _turn(self) -> None:
        """Take the next step of the cycle that some live sequence waits on."""
        waiting = {seq.pending.step for seq in self.live if seq.pending is not None}
        if not waiting:
            return
        for k in range(len(CYCLE)):
            step = CYCLE[(self._cycle + k) % len(CYCLE)]
            if step in waiting:
                self._cycle = (self._cycle + k + 1) % len(CYCLE)
                break
        calls = [seq for seq in self.live if seq.pending is not None and seq.pending.step == step]
        states = [seq.state for seq in self.live]  # by row: a global step's padding rows
        self.stats.turns += 1
        for group in self._groups(step, calls):
            try:
                self.runner.run([seq.pending for seq in group], states)
            except Exception as e:  # the backend failed this call: its requests fail, the rest go on
                err = e if isinstance(e, FastBltError) else InternalError(f"step {step} failed: {e!r}")
                for seq in group:
                    seq.pending, seq.ended, seq.ticket.error = None, True, err
                continue
            self.stats.calls[step] += 1
            self.stats.rows[step] += len(group)
            for seq in group:
                call = seq.pending
                self._advance(seq, call.outputs)

    def _follow(self) -> None:
        """Start the requests waiting for another's prefill: from a copy of it once it ended (this
        turn: the leader's state is still at the prompt's end), or with their own when the leader
        left before it ended (cancelled, or failed)."""
        for seq in self.live:
            leader = seq.leader
            if leader is None or seq.ended:
                continue
            if leader.run.prompt_logits is not None:
                seq.take_prompt()
                self.stats.shared_prefills += 1
            elif leader.ended or leader.ticket.cancelled:
                seq.prefill_alone()
            else:
                continue
            self._advance(seq, None)

    def _groups(self, step: str, seqs: list[_Sequence]) -> list[list[_Sequence]]:
        """Backend calls for one step: one per (size, run of consecutive rows). A step with a
        linear cache (the global step) takes any rows, padded to its widest (the rows between them
        run as padding: StepRunner.run): one call per power-of-two bin of sizes, so a decoding row
        (one patch) is never padded to a prefilling row's eight (every padded patch is computed
        through every layer)."""
        by_size: dict[int, list[_Sequence]] = {}
        if not self.runner.specs[step].ring:
            for seq in seqs:
                by_size.setdefault(1 << (seq.pending.size - 1).bit_length(), []).append(seq)
            return list(by_size.values())
        for seq in seqs:
            by_size.setdefault(seq.pending.size, []).append(seq)
        groups = []
        for same in by_size.values():
            run = [same[0]]
            for seq in same[1:]:
                if seq.state.row == run[-1].state.row + 1:
                    run.append(seq)
                else:
                    groups.append(run)
                    run = [seq]
            groups.append(run)
        return groups

    def _retire(self) -> None:
        """Finish the sequences that ended and give their rows back (`_vacate`)."""
        ended = [seq for seq in self.live if seq.ended or seq.ticket.cancelled]
        if not ended:
            return
        for seq in ended:
            self._finish(seq)
        with self._cv:
            for seq in ended:
                self._vacate(seq.state.row)
            self.stats.active = len(self.live)
        if not self.live:
            self.runner.trim()

    # ------------------------------------------------------------------ rows
    # Live sequences hold rows 0..n-1, each cohort's in one block of consecutive rows (blocks in
    # the order the cohorts arrived), so a cohort's calls are one backend call each. Joining or
    # leaving moves at most one row per later block.
    def _move(self, src: int, dst: int) -> None:
        seq = self.live[src]
        self.rows.move(src, dst)
        self.runner.move_row(src, dst, seq.state.free_slot())
        self.live[dst], self.live[src] = seq, None
        seq.state.row = dst

    def _block_starts(self, first: int) -> list[int]:
        """Rows at which a block starts, from row `first` on."""
        return [i for i in range(first, len(self.live)) if i == first or self.live[i].cohort != self.live[i - 1].cohort]

    def _place(self, seq: _Sequence) -> None:
        """Put a new sequence at the end of its cohort's block (a new cohort: after the last block)."""
        mine = [i for i, other in enumerate(self.live) if other.cohort == seq.cohort]
        row = mine[-1] + 1 if mine else len(self.live)
        later = self._block_starts(row) if row < len(self.live) else []
        self.live.append(None)
        ends = [*later[1:], len(self.live) - 1]  # past each later block's end
        for start, end in reversed(list(zip(later, ends[: len(later)], strict=True))):
            self._move(start, end)
        self.live[row] = seq
        seq.state.row = row

    def _vacate(self, row: int) -> None:
        """Free a row: the last row of its block fills it, the last row of each later block fills
        the hole the block before left; the last row of the batch is then free. Caches the leaving
        sequence lent to its row of a mirror take their own buffers back (a finished one's were let
        go already; a preempted one resumes with them), or a later move of the row would carry them
        as the next sequence's."""
        for cache in self.live[row].state.linear.values():
            cache.take_back()
        cohort = self.live[row].cohort
        end = row
        while end + 1 < len(self.live) and self.live[end + 1].cohort == cohort:
            end += 1
        self.live[row] = None
        if end != row:
            self._move(end, row)
        hole = end
        while hole + 1 < len(self.live):
            block_end = hole + 1
            while block_end + 1 < len(self.live) and self.live[block_end + 1].cohort == self.live[hole + 1].cohort:
                block_end += 1
            self._move(block_end, hole)
            hole = block_end
        self.live.pop()

    def _finish(self, seq: _Sequence) -> None:
        ticket = seq.ticket
        self.stats.generated += len(seq.run.out.ids)
        loaded = seq.run.prefill.get("cached", 0)
        self.stats.prompt_hits += loaded > 0
        self.stats.prompt_hit_ids += loaded
        self.stats.prompt_cache_bytes = self.engine.prompts.stats.bytes
        self.stats.prompt_shared_hits = self.engine.prompts.stats.shared_hits
        if ticket.error is not None:
            self.stats.failed += 1
            self._end(ticket, None, ticket.error)
        elif ticket.cancelled and not seq.run.out.done:
            self.stats.cancelled += 1
            self._end(ticket, None, Cancelled("request cancelled"))
        else:
            seq._stream(final=True)
            self.stats.finished += 1
            n_prompt = len(ticket.request.ids)
            self._end(ticket, generation(seq.run, self.backend_name, n_prompt, self.params, self.config), None)
        seq.state.reset()
        if len(self._idle) < self.max_batch:
            self._idle.append(seq.state)

    @staticmethod
    def _end(ticket: Ticket, result: Generation | None, error: BaseException | None) -> None:
        with contextlib.suppress(Exception):  # a caller's callback must not stop the batch
            ticket._finish(result, error)
