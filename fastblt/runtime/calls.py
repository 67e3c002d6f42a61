"""Step calls: what one sequence asks of a step graph, and running several sequences' asks as one.

A sequence's state (state.py) does not call the backend itself: each of its step methods yields a
`StepCall` (the step, where its new positions start, how many, its small inputs) and receives the
outputs for its own row. A `StepRunner` runs a list of calls of one step as one batched backend
call: a Generator runs each call alone, the batch engine (batch.py) runs many at once. One code
path for both is what makes a batched sequence compute what it computes alone.

Rows of a batched call: the ring caches of the calls' sequences must be consecutive rows of one
RowCaches (the batch engine groups them so). A global step may take any rows: given the batch's
sequences by row (`neighbours`), it runs over the range of rows from the first caller to the last,
the sequences between them as padding rows, on the batch's MirrorRows, where each sequence's
linear cache is lent to its row (no copy per call); otherwise the callers' linear caches (a lent
one where its row is) are gathered into scratch rows. Either way the global step writes the cross
ring of a scratch, and the slots the callers wrote are copied back to their own caches. A call
with fewer positions (patches) than the batch's widest is padded only where the padding cannot
reach what a sequence reads: in scratch rows, and in mirror slots past the ones it reads
(`free_slot`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from collections.abc import Generator as Coroutine
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

from fastblt.engines.base import Backend
from fastblt.errors import InternalError
from fastblt.export.spec import CROSS, PAST, TORCH_DTYPES, StepSpec, max_step, named_kv, past_slots, state_dtype
from fastblt.runtime.caches import KV, HostKV, LinearCache, MirrorRows, RowCaches, host_arrays

R = TypeVar("R")
Outputs = dict[str, Tensor | np.ndarray]  # logits and entropies: numpy; h: as the call's x
Plan = Coroutine["StepCall | None", Outputs, R]  # yields step calls (None: a round ended), returns R
PAD = {"patch_lens": 1}  # padding value of an int input where 0 is not a valid one
_EMPTY = np.zeros(0, dtype=np.int64)  # a padding call's int inputs: all padding
# A global step runs over the range of batch rows its callers span (no copy of their caches) when
# its padding rows hold at most this many patches per caller, else it gathers the callers' caches:
# every padded patch is computed through every layer. 16 streams, two lanes of 8, against gathering
# always: ar +2% at 256 bytes out, +12% at 2,048; blt-s (whose verify steps close several patches
# a row) -2% to -1%, within the noise (docs/serving.md).
PAD_WORK = 1.0
# ... and when the mirror, sized to the batch's longest live row, is under this many times what the
# range's rows read: every row of a call attends over every slot of the mirror (masked)
CAP_SLACK = 2
Copies = list[Callable[[], None]]  # what to copy back to the calls' own caches after a call
MAX_VIEWS = 64  # memoised views per scratch buffer (gathered caches take a new shape as contexts grow)


class Sequence(Protocol):
    """What a runner needs of a call's sequence (state.SequenceState is one): where its caches are,
    and where its share of the call is counted."""

    rows: RowCaches
    row: int
    linear: dict[str, LinearCache]

    def count(self, step: str, positions: int, seconds: float) -> None: ...

    def free_slot(self) -> int: ...  # the first linear-cache slot it does not read (padding may write there)


@dataclass(slots=True)
class StepCall:
    """One sequence's share of a call of `step`: positions (patch slots) at..at+size-1."""

    step: str
    state: Sequence
    at: int
    size: int
    ints: dict[str, np.ndarray]  # its int inputs without the batch dim (padded to the batch's size)
    # its float input: the decoder's h (S, D), the global step's patch bytes (P, L, D); a numpy
    # array where the runner's `numpy` is set, else a tensor on the backend's device
    x: Tensor | np.ndarray | None = None
    outputs: Outputs = field(default_factory=dict)


class StepRunner:
    """Runs calls of one step for up to `rows` sequences as one backend call.

    Owns the per-call input buffers (int inputs sized rows x max_step, allocated once: the same
    addresses call after call, so a backend binds them once per shape) and the scratch buffers of
    gathered caches, with their views memoised (the same tensor object call after call, which a
    backend need not look at again). Not thread-safe: one runner per thread that steps (a
    Generator's sequence, or the batch engine's loop); `locks` (per step) guard the shared backend
    and its output buffers.

    What a call's sequences read comes back to the host: logits and entropies as numpy arrays, byte
    states (h) as numpy arrays where `numpy` (host_arrays) is set, else as tensors on the device.
    """

    def __init__(self, backend: Backend, rows: int, locks: dict[str, contextlib.AbstractContextManager] | None = None):
        self.backend, self.rows = backend, rows
        self.specs: dict[str, StepSpec] = backend.specs
        self.max_step = max_step(self.specs)
        self.locks = locks if locks is not None else dict.fromkeys(self.specs, contextlib.nullcontext())
        device = backend.device
        self._host = device.type == "cpu"
        self.dtype = TORCH_DTYPES[state_dtype(self.specs)]
        self.numpy = host_arrays(device, self.dtype)
        self._ints: dict[tuple[str, str], Tensor] = {}
        for step, spec in self.specs.items():
            for t in spec.inputs:
                if t.dtype == "int32":
                    n = rows * math.prod(self.max_step if isinstance(d, str) else d for d in t.shape[1:])
                    self._ints[step, t.name] = torch.zeros(n, dtype=torch.int32, device=device)
        self._scratch: dict[str, Tensor] = {}  # flat float buffers, grown on demand
        self._scratch_views: dict[str, dict[tuple, tuple[Tensor, np.ndarray | None]]] = {}  # per buffer
        self._views: dict[tuple, tuple[Tensor, np.ndarray]] = {}
        self._out_views: dict[tuple[str, str], tuple[Tensor, np.ndarray]] = {}  # a backend's reused outputs
        self._one_row: dict[tuple, tuple[dict[str, Tensor], list, np.ndarray | None]] = {}  # _one_row_feeds
        self._mirrors: dict[str, MirrorRows] = {}  # per linear stack, for a batch (`neighbours`)
        self._plans = {step: _step_plan(spec) for step, spec in self.specs.items()}

    # ------------------------------------------------------------------ inputs
    def _int_view(self, step: str, name: str, shape: tuple[int, ...]) -> tuple[Tensor, np.ndarray]:
        """The (shape) view of an int input's buffer and its host array (memoised: same address)."""
        key = (step, name, shape)
        views = self._views.get(key)
        if views is None:
            view = self._ints[step, name][: math.prod(shape)].view(shape)
            views = self._views[key] = (view, view.numpy() if self._host else np.empty(shape, dtype=np.int32))
        return views

    def _int_input(self, plan: _StepPlan, name: str, calls: list[StepCall], size: int) -> Tensor:
        """The calls' values of int input `name` in one (b, ...) tensor (rows padded to `size`)."""
        shape = (len(calls), *(size if d is None else d for d in plan.ints[name]))
        view, host = self._int_view(plan.step, name, shape)
        if host.ndim == 1:
            for i, c in enumerate(calls):
                host[i] = c.ints[name]
        else:
            pad = PAD.get(name, 0)
            for i, c in enumerate(calls):
                values = c.ints[name]
                n = len(values)
                host[i, :n] = values
                if n < size:
                    host[i, n:] = pad
        if not self._host:
            view.copy_(torch.from_numpy(host), non_blocking=True)
        return view

    def _scratch_view(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Tensor, np.ndarray | None]:
        """A contiguous (shape) view of a reusable flat buffer (zeroed when it is first made or
        grown), and its numpy twin where `numpy` is set; memoised per shape until the buffer grows."""
        views = self._scratch_views.setdefault(key, {})
        found = views.get(shape)
        if found is not None:
            return found
        n = math.prod(shape)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            views.clear()  # views of the old buffer would keep it alive
            buf = torch.zeros(max(n, 1), dtype=dtype, device=self.backend.device)
            self._scratch[key] = buf
        elif len(views) >= MAX_VIEWS:
            views.clear()
        view = buf[:n].view(shape)
        found = views[shape] = (view, view.numpy() if self.numpy else None)
        return found

    def _float_input(self, step: str, calls: list[StepCall], size: int) -> Tensor:
        """The calls' float inputs in one batch: (b, S, D) h, or (b, P, L, D) patch bytes, zero-padded.

        Copied into a reusable buffer even for one call: the copy is small (one step's new byte
        states), and a buffer that keeps its address is bound once, where a new view of the caller's
        tensor would be bound again on every call."""
        xs = [c.x for c in calls]
        if len(xs) == 1:
            out, host = self._scratch_view(f"{step}.x", (1, *xs[0].shape), self.dtype)
            (host if host is not None else out)[0] = xs[0]
            return out
        inner = tuple(max(x.shape[d] for x in xs) for d in range(1, xs[0].ndim))
        out, host = self._scratch_view(f"{step}.x", (len(xs), size, *inner), self.dtype)
        dst = host if host is not None else out
        if len(inner) > 1:  # patch bytes: every patch is padded to the longest
            dst[...] = 0
        for i, x in enumerate(xs):
            dst[i, : x.shape[0], *(slice(0, n) for n in x.shape[1:])] = x
            if x.shape[0] < size and len(inner) == 1:
                dst[i, x.shape[0] :] = 0
        return out

    def _read(self, step: str, name: str, t: Tensor) -> Tensor | np.ndarray:
        """A copy of output `name` the caller keeps (the backend reuses its buffers): on the host
        through the buffer's memoised numpy view; byte states off the host stay on the device."""
        if self.numpy:
            views = self._out_views.get((step, name))
            if views is None or views[0] is not t:
                views = self._out_views[step, name] = (t, t.detach().numpy())
            return views[1].copy()
        if name == "h":
            return t.clone()
        return (t.float() if t.dtype == torch.bfloat16 else t).to("cpu", copy=True).numpy()

    # ------------------------------------------------------------------ caches
    @staticmethod
    def _consecutive(calls: list[StepCall]) -> bool:
        """The calls' rows are consecutive rows of one RowCaches."""
        rows, first = calls[0].state.rows, calls[0].state.row
        return all(c.state.rows is rows and c.state.row == first + i for i, c in enumerate(calls))

    def _gather(self, key: str, parts: list[KV | HostKV], min_slots: int = 0,
                live: list[int] | None = None) -> tuple[KV, KV | HostKV]:  # fmt: skip
        """Per layer (k, v): the calls' caches (each (1, ..., slots_i, d); numpy views where `numpy`)
        stacked into scratch rows, each padded to the widest along the slot axis (and to at least
        `min_slots`). `live`: per call, the slots it reads (the rest of its row is masked, so left
        as the scratch holds it: a linear cache's buffer is up to an eighth longer than its
        content, and this copy is a long batch's largest host cost). Returns the scratch as the
        backend is fed it and as the host copies it."""
        feed, host = [], []
        for layer in range(len(parts[0])):
            pairs = []
            for j in range(2):
                xs = [p[layer][j] for p in parts]
                # a cache lent to a batch's mirror row is as long as the longest row: with `live`,
                # `min_slots` covers what the calls read and write, and the rest would be masked
                slots = min_slots if live is not None and min_slots else max(min_slots, *(x.shape[-2] for x in xs))
                shape = (len(xs), *xs[0].shape[1:-2], slots, xs[0].shape[-1])
                buf, buf_host = self._scratch_view(f"{key}.{layer}.{j}", shape, self.dtype)
                dst = buf_host if buf_host is not None else buf
                for i, x in enumerate(xs):
                    n = x.shape[-2] if live is None else live[i]
                    if n:
                        dst[i, ..., :n, :] = x[0, ..., :n, :]
                pairs.append((buf, dst))
            feed.append((pairs[0][0], pairs[1][0]))
            host.append((pairs[0][1], pairs[1][1]))
        return feed, host

    @staticmethod
    def _scatter_back(gathered: KV | HostKV, parts: list[KV | HostKV | None], slots: list[list[int] | slice]) -> None:
        """Copy the slots each call's step wrote from the scratch rows back to its own caches (a
        padding row, None, has none)."""
        for layer, (gk, gv) in enumerate(gathered):
            for i, (own, where) in enumerate(zip(parts, slots, strict=True)):
                if own is not None:
                    k, v = own[layer]
                    k[0, ..., where, :] = gk[i, ..., where, :]
                    v[0, ..., where, :] = gv[i, ..., where, :]

    def _cover(self, plan: _StepPlan, calls: list[StepCall], neighbours: list[Sequence]) -> list[StepCall] | None:
        """The calls of a linear-cache step over the range of batch rows from the first caller to
        the last, the sequences between them as padding calls (no positions, placed at their
        `free_slot`); None when the padding would cost more than a gather (PAD_WORK) or the mirror
        cannot hold them (past the stack's position limit)."""
        by_row = {c.state.row: c for c in calls}
        lo, hi = min(by_row), max(by_row) + 1
        size = max(c.size for c in calls)
        if (hi - lo - len(calls)) * size > PAD_WORK * len(calls):
            return None
        x = calls[0].x
        full = []
        for row in range(lo, hi):
            call = by_row.get(row)
            if call is None:
                seq = neighbours[row]
                pad = x[:0, :1] if x is not None else None  # (0, 1, D): no patch
                call = StepCall(plan.step, seq, seq.free_slot(), 0, {n: _EMPTY for n in plan.ints if n != "start"}, pad)
            full.append(call)
        mirror = self._mirror(plan.stack, calls[0].state.linear[plan.stack])
        mirror.fit(max(seq.free_slot() for seq in neighbours) + self.max_step, len(neighbours))
        need = max(c.at for c in full) + size
        # every row attends over the mirror's whole length: where a longer row outside the range
        # sized it, gathering pads only to these rows' widest
        return full if mirror.reserve(need, hi) and mirror.cap < CAP_SLACK * past_slots(need) else None

    def trim(self) -> None:
        """Let go of the batch's mirrors and scratch buffers, which keep the size of the longest
        context they served (a batch calls this when it runs empty: the next requests may be short)."""
        for mirror in self._mirrors.values():
            mirror.release()  # a cache still lent to a row keeps its slots
        self._mirrors.clear()
        self._scratch.clear()
        self._scratch_views.clear()
        self._one_row.clear()

    def move_row(self, src: int, dst: int, upto: int) -> None:
        """A batch moved the sequence in row `src` to row `dst`: the linear cache lent to `src` (its
        slots below `upto`, the sequence's `free_slot`) goes along (MirrorRows.move)."""
        for mirror in self._mirrors.values():
            mirror.move(src, dst, upto)

    def _mirror(self, stack: str, like: LinearCache) -> MirrorRows:
        mirror = self._mirrors.get(stack)
        if mirror is None:
            mirror = self._mirrors[stack] = MirrorRows(like.cfg, self.rows, like.dtype, like.device)
        return mirror

    def _mirror_feeds(self, plan: _StepPlan, calls: list[StepCall], after: Copies) -> dict[str, Tensor]:
        """A covered range's cache inputs (`_cover`): the mirror's rows, each caller's cache lent to
        its row (copied in once); the cross ring (which the global step only writes) a scratch,
        whose slots the callers wrote are copied back after the call."""
        mirror = self._mirrors[plan.stack]
        lo, hi = calls[0].state.row, calls[-1].state.row + 1
        for c in calls:
            cache = c.state.linear[plan.stack]
            if c.size:
                mirror.sync(c.state.row, cache, c.at)
            else:
                mirror.lend(c.state.row, cache)
        feeds = dict(mirror.feeds(lo, hi))
        if plan.cross:
            own = [c.state.rows.cross_rows_host(c.state.row, c.state.row + 1) if c.size else None for c in calls]
            ring = calls[0].state.rows.cross_rows_host(lo, lo + 1)
            # scratch rows of the ring's shape, nothing copied in: the step only writes them
            scratch, host = self._gather(f"{plan.step}.cross", [ring] * len(calls), live=[0] * len(calls))
            feeds |= named_kv(CROSS, scratch)
            C = scratch[0][0].shape[-2]
            slots = [_ring_slots(c.at, c.size, C) for c in calls]
            after.append(lambda: self._scatter_back(host, own, slots))
        return feeds

    def _cache_feeds(self, plan: _StepPlan, calls: list[StepCall], after: Copies) -> dict[str, Tensor]:
        """The step's cache inputs for these calls; `after` gets the copies to make after the call."""
        step, b = plan.step, len(calls)
        first = calls[0].state
        consecutive = b == 1 or self._consecutive(calls)
        if plan.ring:
            if not consecutive:
                raise InternalError(f"step {step}: ring caches of the batch are not consecutive rows")
            feeds = dict(first.rows.feeds(plan.stack, plan.cross, first.row, first.row + b))
        elif b == 1:  # its cache as it is (lent to a mirror row: the whole row, masked past what it reads)
            cache = first.linear[plan.stack]
            cache.for_step(max(calls[0].at + (calls[0].size if plan.writes else 0), 1))
            feeds = dict(cache.feeds())
            if plan.cross:
                feeds |= first.rows.feeds(None, True, first.row, first.row + 1)
        else:  # caches sized per sequence: gathered into scratch rows, written slots copied back
            caches = [c.state.linear[plan.stack] for c in calls]
            for c, cache in zip(calls, caches, strict=True):
                cache.for_step(max(c.at + (c.size if plan.writes else 0), 1))
            own = [cache.host() for cache in caches]
            size = max(c.size for c in calls) if plan.writes else 0  # padded positions are written too
            scratch, host = self._gather(f"{step}.past", own, past_slots(max(c.at for c in calls) + size),
                                         [c.at for c in calls])  # fmt: skip
            feeds = named_kv(PAST, scratch)
            if plan.writes:
                slots = [slice(c.at, c.at + c.size) for c in calls]
                after.append(lambda: self._scatter_back(host, own, slots))
            if plan.cross:  # the cross rings too: this step's rows may be any sequences
                cross = [c.state.rows.cross_rows_host(c.state.row, c.state.row + 1) for c in calls]
                scratch, cross_host = self._gather(f"{step}.cross", cross)
                feeds |= named_kv(CROSS, scratch)
                C = cross[0][0][0].shape[-2]
                ring = [_ring_slots(c.at, c.size, C) for c in calls]
                after.append(lambda: self._scatter_back(cross_host, cross, ring))
        return feeds

    def _one_row_feeds(self, plan: _StepPlan, call: StepCall) -> dict[str, Tensor]:
        """The feeds of a one-row ring call on the host, with the call's values written in: one
        dict per (step, row, size), made once from the memoised views and reused as it is. A
        decoding byte makes three such calls, and rebuilding the dict (the cache views, every int
        input, the float input) costs a third of the host time between them."""
        key = (plan.step, call.state.rows, call.state.row, call.size)  # a ring step's x is (size, D)
        found = self._one_row.get(key)
        if found is None:
            if len(self._one_row) >= MAX_VIEWS:
                self._one_row.clear()
            feeds = dict(call.state.rows.feeds(plan.stack, plan.cross, call.state.row, call.state.row + 1))
            hosts = []
            for name in ("start", *(n for n in plan.ints if n != "start")):
                shape = (1,) if name == "start" else (1, *(call.size if d is None else d for d in plan.ints[name]))
                feeds[name], host = self._int_view(plan.step, name, shape)
                hosts.append((name, host))
            x_host = None
            if plan.x is not None:
                feeds[plan.x], x_host = self._scratch_view(f"{plan.step}.x", (1, *call.x.shape), self.dtype)
            found = self._one_row[key] = (feeds, hosts, x_host)
        feeds, hosts, x_host = found
        for name, host in hosts:
            host[0] = call.at if name == "start" else call.ints[name]
        if x_host is not None:
            x_host[0] = call.x
        return feeds

    # ------------------------------------------------------------------ the call
    def run(self, calls: list[StepCall], neighbours: list[Sequence] | None = None) -> None:
        """Run `calls` (one step) as one backend call; each call's `outputs` get its own rows.

        Ring caches: the calls' sequences must sit in consecutive rows of one RowCaches (InternalError
        otherwise). Every call must carry the same number of positions, except for a step whose
        cache is linear (patches of a global step: padded) and the diffusion head (it writes no
        cache). `neighbours`: a batch's sequences by row; a linear-cache step then runs over the
        range of rows its calls span (`_cover`).
        """
        step = calls[0].step
        plan = self._plans[step]
        real, covered = calls, None
        if neighbours is not None and not plan.ring and plan.writes:
            covered = self._cover(plan, sorted(calls, key=lambda c: c.state.row), neighbours)
        calls = covered or calls
        b = len(calls)
        if b > self.rows:
            raise InternalError(f"step {step}: {b} calls for a runner of {self.rows} rows")
        size = calls[0].size if b == 1 else max(c.size for c in calls)
        if b > 1 and plan.writes and plan.ring and any(c.size != size for c in calls):
            raise InternalError(f"step {step}: calls of {sorted({c.size for c in calls})} positions in one batch")
        after: Copies = []
        if b == 1 and plan.ring and self.numpy:
            feeds = self._one_row_feeds(plan, calls[0])
        else:
            feeds = (self._mirror_feeds if covered else self._cache_feeds)(plan, calls, after)
            start, host = self._int_view(step, "start", (b,))
            for i, c in enumerate(calls):
                host[i] = c.at
            if not self._host:
                start.copy_(torch.from_numpy(host), non_blocking=True)
            feeds["start"] = start
            for name in plan.ints:
                if name != "start":
                    feeds[name] = self._int_input(plan, name, calls, size)
            if plan.x is not None:
                feeds[plan.x] = self._float_input(step, calls, size)
        with self.locks[step]:
            t0 = time.perf_counter()
            out = self.backend.run_step(step, feeds, check=False)
            own = [(name, self._read(step, name, out[name])) for name in plan.read]
            seconds = time.perf_counter() - t0
        for copy in after:
            copy()
        share = seconds / len(real)
        for i, c in enumerate(calls):
            if c.size or covered is None:  # a padding row's outputs are no one's
                c.outputs = {name: t[i, : c.size] if b > 1 else t[0] for name, t in own}
                c.state.count(step, c.size, share)


def _ring_slots(at: int, size: int, slots: int) -> slice | list[int]:
    """The ring slots of positions at..at+size-1: a slice unless they wrap (slicing copies faster)."""
    first = at % slots
    return slice(first, first + size) if first + size <= slots else [(at + j) % slots for j in range(size)]


@dataclass(frozen=True)
class _StepPlan:
    """What a step call needs, read once from the step's spec."""

    step: str
    stack: str
    ring: bool  # its self-attention cache is a ring (rows of a RowCaches), else a LinearCache
    writes: bool  # it writes its caches (every step but the diffusion head)
    cross: bool  # it takes the decoder's cross ring
    ints: dict[str, tuple[int | None, ...]]  # int inputs -> dims after the batch (None: the call's size)
    x: str | None  # its float input from the sequence (h, patch bytes)
    read: tuple[str, ...]  # the outputs a sequence reads


def _step_plan(spec: StepSpec) -> _StepPlan:
    ints = {
        t.name: tuple(None if isinstance(d, str) else d for d in t.shape[1:]) for t in spec.inputs if t.dtype == "int32"
    }
    return _StepPlan(
        step=spec.name,
        stack=spec.stack,
        ring=spec.ring,
        writes=bool(spec.aliases),
        cross=any(t.name.startswith(f"{CROSS}.") for t in spec.inputs),
        ints=ints,
        x=_FLOAT_INPUT.get(spec.name),
        read=_READ[spec.name],
    )


_FLOAT_INPUT = {"decoder": "h", "global": "patch_bytes"}
# the outputs a sequence reads (copied out under the step's lock: the backend reuses its buffers);
# byte states stay on the backend's device, logits and entropies come to the host
_READ = {"entropy": ("entropies",), "encoder": ("h",), "global": (), "decoder": ("logits",),
         "decoder_block": ("logits",)}  # fmt: skip


def run_plan(runner: StepRunner, plan: Plan[R]) -> Coroutine[None, None, R]:
    """Drive a plan alone: run each of its step calls at once; yield where it says a round ended."""
    sent: Outputs | None = None
    while True:
        try:
            call = plan.send(sent)
        except StopIteration as done:
            return done.value
        if call is None:
            yield
            sent = None
        else:
            runner.run([call])
            sent = call.outputs
