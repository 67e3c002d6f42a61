"""Host state of one sequence: tokens, entropies, patch boundaries, byte states and the caches of
all four stacks, driven through any backend's step graphs.

Frontiers: `n` bytes are committed (every cache valid below n); `g_len` global entries are valid
(one per patch closed below n, so g_len == closed[n]). Positions >= n may hold speculative work
(drafts) that the next `append` overwrites. Rolling back is moving `n` back: O(1) besides the
bookkeeping arrays, which are indexed by position and never shifted. The step graphs write their
caches in place (export/spec.py): windowed stacks into rings of window + max_step slots, the
global transformer into a linear buffer that grows with the context, up to the global model's
position limit. A rollback may go back at most max_step positions from the furthest written one
(what the decoding loops do), so the rings never lose a position still in a window.

The step methods do not call the backend: they are plans that yield step calls (calls.py), run by
the state's own runner or, for a row of a batch, by the batch engine with other rows' calls.

Sharing a backend between threads: pass the same `locks` (one per step; one lock for every step
where the backend cannot run two steps at once) to every state on that backend. Each step call
(run_step plus copying out its outputs) runs under its step's lock, and every array or tensor a
method returns is this state's own copy, so states on one backend can interleave their steps.
Per-state counters (`calls`, `positions`, `backend_seconds`) count only this state's steps (a
batched call: its share of the time).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fastblt.engines.base import Backend
from fastblt.errors import InputError, InternalError, PositionLimit
from fastblt.export.spec import TORCH_DTYPES, max_step, state_dtype
from fastblt.model.config import HASH_PRIMES, BltConfig
from fastblt.model.patching import closes_patch
from fastblt.runtime.caches import KV, LinearCache, RowCaches, buffer, host_arrays, packed, stack_configs
from fastblt.runtime.calls import Plan, R, StepCall, StepRunner, run_plan


@dataclass
class Snapshot:
    """A sequence at a committed frontier `n` (SequenceState.save / load), in buffers of its own,
    or `borrowed`: views of the live sequence's, to be written out or copied before it changes."""

    n: int
    g_len: int
    rows: list[torch.Tensor]  # its ring and cross rows (RowCaches.row)
    linear: dict[str, KV]  # each unwindowed stack's slots below g_len
    host: dict[str, np.ndarray]  # the bookkeeping arrays below n (closed: below n + 1)
    h: torch.Tensor  # byte states below n
    borrowed: bool = False

    def tensors(self) -> list[torch.Tensor]:
        """Its tensors: rows, then each stack's (k, v) per layer, then h."""
        return [*self.rows, *(t for kv in self.linear.values() for pair in kv for t in pair), self.h]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors()) + sum(a.nbytes for a in self.host.values())

    def copy(self) -> Snapshot:
        """This snapshot in one buffer of its own (`packed`)."""
        copies = iter(packed(self.tensors()))
        rows = [next(copies) for _ in self.rows]
        linear = {name: [(next(copies), next(copies)) for _ in kv] for name, kv in self.linear.items()}
        return Snapshot(self.n, self.g_len, rows, linear, self.host, next(copies))


class HostArrays:
    """Per-position bookkeeping, grown on demand (positions are never shifted)."""

    def __init__(self, capacity: int = 1024):
        self.tokens = np.zeros(capacity, dtype=np.int64)
        self.entropies = np.zeros(capacity, dtype=np.float32)
        self.closes = np.zeros(capacity, dtype=bool)  # byte i ends its patch
        self.closed = np.zeros(capacity + 1, dtype=np.int64)  # closed[i]: patches closed at bytes < i
        self.patch_len = np.zeros(capacity, dtype=np.int64)  # bytes of i's patch up to and including i

    def ensure(self, end: int) -> None:
        if end + 1 <= len(self.tokens):
            return
        cap = max(end + 1, 2 * len(self.tokens))
        for name in ("tokens", "entropies", "closes", "patch_len"):
            old = getattr(self, name)
            new = np.zeros(cap, dtype=old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)
        closed = np.zeros(cap + 1, dtype=np.int64)
        closed[: len(self.closed)] = self.closed
        self.closed = closed


class IncrementalHasher:
    """Hash n-gram ids of new positions from the ids just before them, bit-exact with
    `hash_ids_numpy` (int64 wrap-around sums, then floor-mod) in one vectorised product: every
    table's prime powers sit right-aligned in one (tables, max_n) matrix, zero where its n-gram
    is shorter, and each new position's window of max_n ids is multiplied by all of them at once."""

    def __init__(self, config: BltConfig):
        self.vocab = np.int64(config.hash_vocab)
        width = max(config.hash_sizes)
        self.pad = width - 1
        rows = []
        for f in range(config.hash_functions):
            prime = HASH_PRIMES[f % len(HASH_PRIMES)]
            for n in config.hash_sizes:
                powers = [pow(prime, j, 1 << 64) for j in range(n)]  # p^j mod 2^64: int64 wrap-around
                rows.append([0] * (width - n) + powers)
        self.powers = np.array(rows, dtype=np.uint64).view(np.int64)  # (tables, max_n)

    def __call__(self, window: np.ndarray, S: int) -> np.ndarray:
        """window (pad + S,) int64: the pad = max_n - 1 ids before the new ones (0 = BOE where
        missing), then the S new ids -> (S, tables) int32."""
        grams = window[None] if S == 1 else window[np.arange(S)[:, None] + np.arange(self.pad + 1)]  # (S, max_n)
        h = grams @ self.powers.T  # (S, tables): int64 products and sums wrap around, i.e. mod 2^64
        return np.mod(h, self.vocab).astype(np.int32)


class SequenceState:
    """One sequence over a backend: its positions, patches and caches, and the step calls that
    advance it. Not thread-safe: one state per generation call.

    Step methods (`append`, `force_close`, `run_*`) are plans: generators that yield `StepCall`s
    and return their result once the calls are run, by this state's own runner (`run`) or by the
    batch engine together with other sequences' calls. Caches live on `backend.device`; a state
    alone holds them in a RowCaches of one row, a batched one in its row of the batch's.
    """

    def __init__(
        self,
        backend: Backend,
        config: BltConfig,
        locks: dict[str, contextlib.AbstractContextManager] | None = None,
        rows: RowCaches | None = None,
        row: int = 0,
    ):
        if config.entropy is None:
            raise InputError("checkpoint: the runtime needs an entropy model to patch")
        self.backend, self.config = backend, config
        specs = backend.specs
        self.max_step = max_step(specs)
        dtype = TORCH_DTYPES[state_dtype(specs)]
        self.dtype, self.device = dtype, backend.device
        self.rows = rows if rows is not None else RowCaches(specs, config, 1, dtype, self.device)
        self.row = row
        self.linear: dict[str, LinearCache] = {
            name: LinearCache(cfg, dtype, self.device)
            for name, cfg in stack_configs(config).items()
            if not specs[name].ring
        }
        # a batched state's calls are run by its batch; one alone runs its own
        self.runner = StepRunner(backend, 1, locks) if rows is None else None
        self.host = HostArrays()
        self.numpy = host_arrays(self.device, dtype)  # byte states and float inputs as numpy arrays
        self.h = buffer((1024, config.encoder.dim), dtype, self.device)  # encoder byte states
        self._h = self.h.numpy() if self.numpy else self.h  # what the host reads and writes
        self.hasher = IncrementalHasher(config)
        self.patch_limit = config.global_model.max_positions
        self.n = 0
        self.g_len = 0
        self.written = 0  # positions < written have been written to the rings (some maybe rolled back)
        self._forced_at: int | None = None  # n at which slot g_len holds the open patch's forced latent
        self._global_end = 0  # while a global step runs in parts: the slot after its last patch
        self.reset_counters()

    # the bookkeeping arrays, by position
    @property
    def tokens(self) -> np.ndarray:
        return self.host.tokens

    @property
    def closes(self) -> np.ndarray:
        return self.host.closes

    @property
    def closed(self) -> np.ndarray:
        return self.host.closed

    @property
    def patch_len(self) -> np.ndarray:
        return self.host.patch_len

    @property
    def entropies(self) -> np.ndarray:
        return self.host.entropies

    def reset_counters(self) -> None:
        """Zero this state's per-step counters (calls, positions run, backend seconds)."""
        self.calls: dict[str, int] = dict.fromkeys(self.backend.specs, 0)
        self.positions: dict[str, int] = dict.fromkeys(self.backend.specs, 0)
        self.seconds: dict[str, float] = dict.fromkeys(self.backend.specs, 0.0)  # per step: no shared sum

    def count(self, step: str, positions: int, seconds: float) -> None:
        """One step call this state took part in (its share of a batched call's time)."""
        self.calls[step] += 1
        self.positions[step] += positions
        self.seconds[step] += seconds

    @property
    def backend_seconds(self) -> float:
        """Time in step calls (overlapped ones each count theirs; a batched call its share)."""
        return sum(self.seconds.values())

    def cache_bytes(self) -> int:
        """Bytes held by this sequence's caches and byte states (what grows with the context)."""
        return self.rows.row_bytes() + sum(c.nbytes() for c in self.linear.values()) + self.h.nbytes

    def run(self, plan: Plan[R]) -> R:
        """Run a plan's step calls now, one by one, on this state's own runner; its result."""
        if self.runner is None:
            raise InputError("run: this sequence is a row of a batch; its batch runs its step calls")
        steps = run_plan(self.runner, plan)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    # ------------------------------------------------------------------ helpers
    def _check_step(self, S: int, at: int | None = None) -> None:
        """S fits one call; a step writing positions at..at+S-1 moves the written frontier."""
        if not 1 <= S <= self.max_step:
            raise InputError(f"step: {S} new positions; the graphs take 1 to max_step = {self.max_step} per call")
        if at is not None:
            self.written = max(self.written, at + S)

    def _room(self, end: int) -> None:
        """Grow the per-position arrays to hold positions < end."""
        self.host.ensure(end)
        if end > len(self._h):  # the host view: a numpy call where the tensor's would cost more
            grown = buffer((max(end, len(self._h) * 3 // 2), self.h.shape[1]), self.dtype, self.device)
            grown[: len(self._h)] = self.h
            self.h = grown
            self._h = grown.numpy() if self.numpy else grown

    def draft_room(self) -> int:
        """Drafts a verify step after the pending byte may hold without its global step passing
        the model's position limit (each of its positions may close a patch): near the limit a
        drafting mode then fails exactly where ar does, not a round early."""
        return max(self.patch_limit - self.g_len - 1, 0)

    def open_patch_start(self, n: int | None = None) -> int:
        """First byte of the patch still open after n committed bytes (== n if none is open)."""
        n = self.n if n is None else n
        return n - int(self.patch_len[n - 1]) if n > 0 and not self.closes[n - 1] else n

    # ------------------------------------------------------------------ the four stacks
    def run_entropy(self, at: int, tokens: np.ndarray) -> Plan[np.ndarray]:
        """Entropies (S,) of the next byte after each of tokens at positions at.."""
        self._check_step(len(tokens), at)
        out = yield StepCall("entropy", self, at, len(tokens), {"tokens": tokens})
        return out["entropies"].astype(np.float32, copy=False)

    def run_encoder(self, at: int, tokens: np.ndarray) -> Plan[None]:
        """Encoder states for tokens placed at positions at.. (writes self.h and the encoder cache)."""
        S = len(tokens)
        self._check_step(S, at)
        self._room(at + S)
        self.tokens[at : at + S] = tokens
        pad = self.hasher.pad
        lo = at - pad
        window = (
            self.tokens[lo : at + S] if lo >= 0 else np.concatenate([np.zeros(-lo, np.int64), self.tokens[: at + S]])
        )
        hash_ids = self.hasher(window, S)
        out = yield StepCall("encoder", self, at, S, {"tokens": tokens, "hash_ids": hash_ids})
        self._h[at : at + S] = out["h"]

    def run_global(self, spans: list[tuple[int, int]], at: int) -> Plan[None]:
        """Global steps over patches given as byte spans [s, e) (max_step per call); their entries go
        to patch slots at.."""
        m = self.max_step
        if len(spans) > m:
            self._global_end = at + len(spans)  # slots a later part reads: no padding row may write them
            try:
                for i in range(0, len(spans), m):
                    yield from self.run_global(spans[i : i + m], at + i)
            finally:
                self._global_end = 0
            return
        end = at + len(spans)
        if end > self.patch_limit:
            raise PositionLimit(
                f"sequence: {end} patches exceed the global model's limit of {self.patch_limit} patches "
                f"(reached after {spans[-1][1]} bytes); shorten the prompt or max_bytes",
                self.patch_limit,
                spans[-1][1],
            )
        L = max(e - s for s, e in spans)
        shape = (len(spans), L, self.config.encoder.dim)
        if self.numpy:
            patch_bytes = np.zeros(shape, dtype=self._h.dtype)
        else:
            patch_bytes = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for j, (s, e) in enumerate(spans):
            patch_bytes[j, : e - s] = self._h[s:e]
        lens = np.array([e - s for s, e in spans])
        yield StepCall("global", self, at, len(spans), {"patch_lens": lens}, patch_bytes)

    def run_decoder(self, at: int, S: int, read_patch: np.ndarray) -> Plan[np.ndarray]:
        """Causal decoder over byte states h[at:at+S] -> logits (S, V); writes the decoder cache."""
        self._check_step(S, at)
        out = yield StepCall("decoder", self, at, S, {"read_patch": read_patch}, self._h[at : at + S])
        return out["logits"]

    def run_block(self, block_ids: np.ndarray, read_patch: int, at: int | None = None) -> Plan[np.ndarray]:
        """The diffusion head on a block at positions at..at+B-1 (default at = n) -> logits (B, V).

        The block attends to the committed decoder cache below `at` (at <= n) and to itself, and
        reads the latent in slot `read_patch`. Writes nothing.
        """
        at = self.n if at is None else at
        if not 0 <= at <= self.n:
            raise InputError(f"run_block: block start {at} is outside [0, {self.n}]")
        self._check_step(len(block_ids))
        ints = {"block_ids": np.asarray(block_ids), "read_patch": np.int32(read_patch)}
        out = yield StepCall("decoder_block", self, at, len(block_ids), ints)
        return out["logits"]

    # ------------------------------------------------------------------ sequence operations
    def append(
        self, tokens: list[int] | np.ndarray, encoded: bool = False, close_open: bool = False
    ) -> Plan[np.ndarray]:
        """Commit tokens at positions n..n+S-1; returns their next-byte logits (S, V), on the host.

        Runs the entropy step, the encoder step (skipped when `encoded`: drafting already wrote
        these positions' encoder states, which do not depend on patching), one global step for
        every patch the new bytes close, and the causal decoder step; more than max_step tokens
        are committed max_step at a time.

        close_open: also force-close the patch left open after these bytes in the same global
        step (what `force_close` would do next, without a pass of its own); its latent sits
        uncounted in slot g_len and `force_close` returns it while nothing else has changed.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        S, at, m = len(tokens), self.n, self.max_step
        if S == 0:
            raise InputError("append: no tokens")
        if m < S:  # one step per max_step positions
            parts = []
            for i in range(0, S, m):
                parts.append((yield from self.append(tokens[i : i + m], encoded, close_open and i + m >= S)))
            return np.concatenate(parts)
        if encoded:
            self._room(at + S)
            self.tokens[at : at + S] = tokens
        else:  # records the tokens itself
            yield from self.run_encoder(at, tokens)
        ent = yield from self.run_entropy(at, tokens)
        spans = self._mark_patches(at, ent)
        self._forced_at = None
        s_open = self.open_patch_start(at + S) if close_open else at + S
        # the forced latent takes the slot after the closed patches: none past the position limit
        forced = [(s_open, at + S)] if s_open < at + S and self.g_len + len(spans) < self.patch_limit else []
        if spans or forced:
            yield from self.run_global(spans + forced, self.g_len)
            self.g_len += len(spans)
            self._forced_at = at + S if forced else None
        logits = yield from self.run_decoder(at, S, self._reads(at, S))
        self.n = at + S
        return logits

    def prefill(
        self, tokens: list[int] | np.ndarray, chunk: int, scores: Callable[[np.ndarray], None] | None = None
    ) -> Plan[np.ndarray]:
        """Commit a prompt in chunks of `chunk` positions; returns the last position's next-byte
        logits (V,). What `append` of each chunk in turn computes, with fewer global steps.
        `scores`, when given, sees every position's logits (S, V) in order, as they come.

        The entropy and encoder steps of consecutive chunks run first while the patches they close
        fit one global step (max_step patches; the cross ring holds those and the one before), then
        one global step for all of them, then the chunks' decoder steps. A global step costs more
        than its patches (its weights and every earlier patch are read whatever it computes), so
        about a quarter of the calls commit a prompt 12-18% faster (docs/generation.md)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) == 0:
            raise InputError("prefill: no tokens")
        group: list[tuple[int, int]] = []  # (at, S) of chunks encoded and patched, not decoded
        spans: list[tuple[int, int]] = []  # the patches they close
        at = self.n
        for i in range(0, len(tokens), chunk):
            part = tokens[i : i + chunk]
            yield from self.run_encoder(at, part)  # checks the chunk's size; records the bytes
            ent = yield from self.run_entropy(at, part)
            closed = self._mark_patches(at, ent)
            if len(spans) + len(closed) > self.max_step:  # the pending chunks first
                yield from self._decode_group(group, spans, scores)
                group, spans = [], []
            group.append((at, len(part)))
            spans += closed
            at += len(part)
        logits = yield from self._decode_group(group, spans, scores)
        return logits[-1]

    def _decode_group(
        self, group: list[tuple[int, int]], spans: list[tuple[int, int]], scores: Callable[[np.ndarray], None] | None
    ) -> Plan[np.ndarray]:
        """One global step for the patches `group`'s chunks close, then their decoder steps in order."""
        self._forced_at = None
        if spans:
            yield from self.run_global(spans, self.g_len)
            self.g_len += len(spans)
        logits = None
        for at, S in group:
            logits = yield from self.run_decoder(at, S, self._reads(at, S))
            self.n = at + S
            if scores is not None:
                scores(logits)
        return logits

    def _reads(self, at: int, S: int) -> np.ndarray:
        """The patch each of positions at..at+S-1 reads: the last one closed at or before it."""
        return self.closed[at + 1 : at + S + 1] - 1

    def _mark_patches(self, at: int, ent: np.ndarray) -> list[tuple[int, int]]:
        """Patch bookkeeping for bytes at..at+S-1; returns the spans of the patches they close.
        Worked out in Python numbers and written back a slice per array: a decoding byte does this
        once, and numpy element reads and writes cost microseconds each on evicted caches."""
        host, patching, S = self.host, self.config.patching, len(ent)
        host.entropies[at : at + S] = ent
        closes, length = (bool(host.closes[at - 1]), int(host.patch_len[at - 1])) if at > 0 else (True, 0)
        count = int(host.closed[at])
        spans, lengths, flags, counts = [], [], [], []
        for j, h_i in enumerate(ent.tolist()):
            i = at + j
            length = 1 if closes else length + 1
            closes = closes_patch(i, h_i, length, patching)
            if closes:
                count += 1
                spans.append((i + 1 - length, i + 1))
            lengths.append(length)
            flags.append(closes)
            counts.append(count)
        host.patch_len[at : at + S] = lengths
        host.closes[at : at + S] = flags
        host.closed[at + 1 : at + S + 1] = counts
        return spans

    def rollback(self, n: int) -> None:
        """Forget everything at positions >= n (O(1): frontiers move, buffers stay).

        At most max_step positions past n may have been written (the rings keep max_step slots
        beyond a window for them); `reset` starts a sequence over.
        """
        if not 0 <= n <= self.n:
            raise InputError(f"rollback: {n} is outside [0, {self.n}]")
        if self.written - n > self.max_step:
            raise InputError(
                f"rollback: back to {n} from {self.written} written positions is more than max_step = "
                f"{self.max_step} (the rings keep that many past a window); reset() to start over"
            )
        if n != self.n:
            self._forced_at = None
        self.n = n
        self.g_len = int(self.closed[n])

    def reset(self) -> None:
        """An empty sequence on the same buffers (a new one fills every position from 0 before it is
        read, so no ring needs clearing); linear caches shrink back to one bucket."""
        self.n, self.g_len, self.written, self._forced_at, self._global_end = 0, 0, 0, None, 0
        for cache in self.linear.values():
            cache.reset()

    def copy_from(self, src: SequenceState) -> None:
        """Become a copy of `src`, another row of the same batch, at its frontier: positions,
        patches, byte states and every cache (what `src` wrote past its frontier too, which the
        next step overwrites). The step graphs compute each row as they compute it alone, so a
        copy of another request's prefill is what this one's own would have made."""
        if src.rows is not self.rows:
            raise InputError("copy_from: the states are not rows of one batch")
        self.rows.move(src.row, self.row)
        for name, cache in self.linear.items():
            cache.copy_from(src.linear[name], src.free_slot())
        host = {name: getattr(src.host, name) for name in ("tokens", "entropies", "closes", "closed", "patch_len")}
        self._adopt(host, src._h[: src.written], src.n, src.g_len, src.written, src._forced_at, src._global_end)

    def save(self, copy: bool = True) -> Snapshot:
        """This sequence at its frontier, in buffers of its own (a prompt snapshot: prompt_cache.py);
        `copy=False`: borrowed, views of this sequence's (PromptCache.put writes them to a file or
        copies them). Taken between steps, with nothing written past the frontier."""
        n, g = self.n, self.g_len
        if self.written != n or self._forced_at is not None or self._global_end:
            raise InternalError("save: the sequence holds work past its frontier")
        host = {name: getattr(self.host, name)[:n].copy() for name in ("tokens", "entropies", "closes", "patch_len")}
        host["closed"] = self.host.closed[: n + 1].copy()
        linear = {name: cache.prefix(g) for name, cache in self.linear.items()}
        snap = Snapshot(n, g, self.rows.row(self.row), linear, host, self.h[:n], borrowed=True)
        return snap.copy() if copy else snap

    def saved_bytes(self) -> int:
        """What `save` would hold now (Snapshot.nbytes), without taking it."""
        n, g = self.n, self.g_len
        linear = sum(c.nbytes() // c.slots * g for c in self.linear.values())
        host = n * sum(a.itemsize for a in (self.host.tokens, self.host.entropies, self.host.closes,
                                            self.host.patch_len)) + (n + 1) * self.host.closed.itemsize  # fmt: skip
        return self.rows.row_bytes() + linear + n * self.h[0].nbytes + host

    def load(self, snap: Snapshot) -> None:
        """Become the sequence `save` took (on a backend of the same specs): what continuing from
        there computes is what the saved sequence would have computed."""
        self.rows.load_row(self.row, snap.rows)
        for name, cache in self.linear.items():
            cache.copy_from(snap.linear[name], snap.g_len)
        self._adopt(snap.host, snap.h.numpy() if self.numpy else snap.h, snap.n, snap.g_len, snap.n)

    def _adopt(self, host: dict[str, np.ndarray], h: np.ndarray | torch.Tensor, n: int, g_len: int, written: int,
               forced_at: int | None = None, global_end: int = 0) -> None:  # fmt: skip
        """Take another sequence's bookkeeping arrays (from position 0), byte states below `written`
        and frontiers (copy_from, load)."""
        self.host = HostArrays(max(1024, len(host["tokens"]) + 1))
        for name, arr in host.items():
            getattr(self.host, name)[: len(arr)] = arr
        self._room(written)
        self._h[:written] = h
        self.n, self.g_len, self.written = n, g_len, written
        self._forced_at, self._global_end = forced_at, global_end

    def free_slot(self) -> int:
        """The first global-cache slot this sequence does not read: a padding row of a batched global
        step may write from there. Slots from g_len on are scratch, except the forced latent in
        slot g_len while `force_close` may still return it, and the slots the earlier parts of a
        global step split in max_step parts wrote (g_len counts them only after the last part)."""
        return max(self.g_len + (self._forced_at is not None), self._global_end)

    def force_close(self) -> Plan[int]:
        """The paper's block-start rule: the latent the next block reads.

        If a patch is open, run a global step on it as if it closed now and return its slot
        (g_len, which stays uncounted: the next commit overwrites it, an O(1) rollback);
        otherwise return the last closed patch.
        """
        s = self.open_patch_start()
        if s == self.n:
            return self.g_len - 1
        if self._forced_at != self.n:  # not already computed by append(close_open=True)
            yield from self.run_global([(s, self.n)], self.g_len)
            self._forced_at = self.n
        return self.g_len
