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

Sharing a backend between threads: pass the same `locks` (one per step; one lock for every step
where the backend cannot run two steps at once) to every state on that backend. Each step
(run_step plus reading its outputs into this state's buffers) runs under its step's lock, and
every array or tensor a method returns is this state's own copy, so states on one backend can
interleave their steps. Per-state counters (`calls`, `positions`, `backend_seconds`) count only this
state's steps.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import time

import numpy as np
import torch
from torch import Tensor

from fastblt.engines.base import Backend
from fastblt.errors import InputError
from fastblt.export.spec import (
    CROSS,
    PAST,
    PAST_BUCKET,
    TORCH_DTYPES,
    StepSpec,
    cross_slots,
    max_step,
    named_kv,
    state_dtype,
)
from fastblt.model.config import HASH_PRIMES, BltConfig, StackConfig
from fastblt.model.patching import closes_patch

KV = list[tuple[Tensor, Tensor]]


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zeroed buffer. On the host, its own anonymous memory map: a cache that grows replaces its
    buffers every few patches, and unmapping gives the old ones back to the system at once, where
    the C heap would keep them (fragmented) and the process would grow by more than it holds."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.finfo(dtype).bits // 8
    return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=dtype, count=math.prod(shape)).view(shape)


def _zeros_kv(cfg: StackConfig, slots: int, dtype: torch.dtype, device: torch.device) -> KV:
    shape = (1, cfg.n_heads, slots, cfg.head_dim)
    return [(_buffer(shape, dtype, device), _buffer(shape, dtype, device)) for _ in range(cfg.n_layers)]


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class LinearCache:
    """An unwindowed stack's cache: buffers (1, heads, slots, head_dim) per layer holding the live
    prefix rounded up to PAST_BUCKET slots, grown (copied into larger buffers) as the sequence
    reaches a new bucket, so memory and a step's cost follow the context. A prefix along the slot
    axis of a (heads, slots) buffer is not contiguous, so the buffers are sized to it instead."""

    def __init__(self, cfg: StackConfig, dtype: torch.dtype, device: torch.device):
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.limit = _round_up(cfg.max_positions, PAST_BUCKET)
        self.kv = _zeros_kv(cfg, PAST_BUCKET, dtype, device)

    @property
    def slots(self) -> int:
        return self.kv[0][0].shape[2]

    def for_step(self, end: int) -> KV:
        """The buffers, holding at least `end` slots (grown first when needed)."""
        if end > self.slots:
            self._resize(min(_round_up(end, PAST_BUCKET), self.limit))
        return self.kv

    def reset(self) -> None:
        """Back to one bucket (a new sequence)."""
        if self.slots != PAST_BUCKET:
            self.kv = _zeros_kv(self.cfg, PAST_BUCKET, self.dtype, self.device)

    def _resize(self, slots: int) -> None:
        """One buffer at a time, so the copy needs one layer's worth of extra memory, not a model's."""
        for i, pair in enumerate(self.kv):
            new = []
            for old in pair:
                buf = _buffer((*old.shape[:2], slots, old.shape[3]), self.dtype, self.device)
                buf[:, :, : old.shape[2]].copy_(old)
                new.append(buf)
            self.kv[i] = (new[0], new[1])
            del pair, new

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv)


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
        missing), then the S new ids -> (1, S, tables) int32."""
        grams = np.lib.stride_tricks.sliding_window_view(window, self.pad + 1)  # (S, max_n)
        with np.errstate(over="ignore"):
            h = (grams[:, None, :] * self.powers[None]).sum(-1)  # (S, tables), mod 2^64
        return np.mod(h, self.vocab).astype(np.int32)[None]


class StepInputs:
    """One sequence's small per-call inputs (the int32 ones of every step: ids, positions, patch
    lengths), allocated once per step on the backend's device, sized for max_step, and filled in
    place: their addresses never change, so a backend binds them once per shape, not per call,
    and two steps running at once never share one."""

    def __init__(self, specs: dict[str, StepSpec], device: torch.device):
        self.host = device.type == "cpu"
        steps = max_step(specs)
        self.bufs: dict[tuple[str, str], Tensor] = {}
        for step, spec in specs.items():
            for t in spec.inputs:
                if t.dtype == "int32":
                    shape = [1 if d == "batch" else steps if isinstance(d, str) else d for d in t.shape]
                    self.bufs[step, t.name] = torch.zeros(shape, dtype=torch.int32, device=device)

    def put(self, step: str, name: str, values: np.ndarray | list[int]) -> Tensor:
        """Write values ((S,) or (S, T); one value for a (batch,) input) into the step's buffer;
        returns the (1, S, ...) view the step is fed."""
        buf = self.bufs[step, name]
        values = np.asarray(values)
        view = buf[:, : len(values)] if buf.dim() > 1 else buf
        if self.host:
            view.numpy()[...] = values.reshape(view.shape)
        else:
            view.copy_(torch.from_numpy(values.astype(np.int32)).view(view.shape), non_blocking=True)
        return view


class SequenceState:
    """One sequence (batch 1) over a backend. Not thread-safe: one state per generation call.

    Caches and byte states live on `backend.device`, so a step moves only its small feeds there;
    logits and entropies come back to the host.
    """

    def __init__(
        self,
        backend: Backend,
        config: BltConfig,
        locks: dict[str, contextlib.AbstractContextManager] | None = None,
    ):
        if config.entropy is None:
            raise InputError("checkpoint: the runtime needs an entropy model to patch")
        self.backend, self.config = backend, config
        specs = backend.specs
        self.max_step = max_step(specs)
        dtype = TORCH_DTYPES[state_dtype(specs)]
        self.dtype, self.device = dtype, backend.device
        stacks = {"entropy": config.entropy, "encoder": config.encoder, "global": config.global_model}
        stacks["decoder"] = config.decoder
        self.rings: dict[str, KV] = {}
        self.linear: dict[str, LinearCache] = {}
        for name, cfg in stacks.items():
            slots = specs[name].slots
            if isinstance(slots, int):
                self.rings[name] = _zeros_kv(cfg, slots, dtype, self.device)
            else:
                self.linear[name] = LinearCache(cfg, dtype, self.device)
        cross_shape = (1, 1, cross_slots(self.max_step), config.cross_attn_k * config.decoder.dim)
        self.cross: KV = [
            (
                torch.zeros(cross_shape, dtype=dtype, device=self.device),
                torch.zeros(cross_shape, dtype=dtype, device=self.device),
            )
            for _ in range(config.decoder_cross_layers)
        ]
        self.host = HostArrays()
        self.h = _buffer((1024, config.encoder.dim), dtype, self.device)  # encoder byte states
        self.hasher = IncrementalHasher(config)
        self.patch_limit = config.global_model.max_positions
        self.n = 0
        self.g_len = 0
        self.written = 0  # positions < written have been written to the rings (some maybe rolled back)
        self._forced_at: int | None = None  # n at which slot g_len holds the open patch's forced latent
        self.locks = locks if locks is not None else dict.fromkeys(specs, contextlib.nullcontext())
        self.inputs = StepInputs(specs, self.device)
        # one feed dict per step, reused: the ring and cross caches are bound once, the rest refilled
        self._feeds: dict[str, dict[str, Tensor]] = {step: {} for step in specs}
        for step, spec in specs.items():
            if spec.stack in self.rings:
                self._feeds[step] |= named_kv(PAST, self.rings[spec.stack])
            if any(t.name.startswith(f"{CROSS}.") for t in spec.inputs):
                self._feeds[step] |= named_kv(CROSS, self.cross)
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

    @property
    def backend_seconds(self) -> float:
        """Time in step calls (overlapped ones each count theirs)."""
        return sum(self.seconds.values())

    def cache_bytes(self) -> int:
        """Bytes held by this sequence's caches and byte states (what grows with the context)."""
        rings = sum(k.nbytes + v.nbytes for kv in self.rings.values() for k, v in kv)
        cross = sum(k.nbytes + v.nbytes for k, v in self.cross)
        return rings + cross + sum(c.nbytes() for c in self.linear.values()) + self.h.nbytes

    def _run(self, step: str, feeds: dict[str, Tensor], positions: int) -> dict[str, Tensor]:
        """run_step + this state's counters; call with the step's lock held (its outputs are shared)."""
        t0 = time.perf_counter()
        out = self.backend.run_step(step, feeds, check=False)
        self.seconds[step] += time.perf_counter() - t0
        self.calls[step] += 1
        self.positions[step] += positions
        return out

    # ------------------------------------------------------------------ helpers
    def _step_feeds(self, step: str, stack: str, at: int, end: int) -> dict[str, Tensor]:
        """The feed dict of `step` at start `at`, its cache holding at least `end` slots."""
        feeds = self._feeds[step]
        feeds["start"] = self.inputs.put(step, "start", [at])
        if stack in self.linear:  # its buffers may grow (a new address and shape)
            cache = self.linear[stack]
            if end > cache.slots:  # hold no old buffer while it is replaced: they go one by one
                for other, spec in self.backend.specs.items():
                    if spec.stack == stack:
                        self._feeds[other] = {k: v for k, v in self._feeds[other].items() if not k.startswith(PAST)}
                feeds = self._feeds[step]
            feeds |= named_kv(PAST, cache.for_step(max(end, 1)))
        return feeds

    def _check_step(self, S: int, at: int | None = None) -> None:
        """S fits one call; a step writing positions at..at+S-1 moves the written frontier."""
        if not 1 <= S <= self.max_step:
            raise InputError(f"step: {S} new positions; the graphs take 1 to max_step = {self.max_step} per call")
        if at is not None:
            self.written = max(self.written, at + S)

    def _room(self, end: int) -> None:
        """Grow the per-position arrays to hold positions < end."""
        self.host.ensure(end)
        if end > self.h.shape[0]:
            grown = _buffer((max(end, self.h.shape[0] * 3 // 2), self.h.shape[1]), self.dtype, self.device)
            grown[: self.h.shape[0]] = self.h
            self.h = grown

    def open_patch_start(self, n: int | None = None) -> int:
        """First byte of the patch still open after n committed bytes (== n if none is open)."""
        n = self.n if n is None else n
        return n - int(self.patch_len[n - 1]) if n > 0 and not self.closes[n - 1] else n

    # ------------------------------------------------------------------ the four stacks
    def run_entropy(self, at: int, tokens: np.ndarray) -> np.ndarray:
        self._check_step(len(tokens), at)
        feeds = self._step_feeds("entropy", "entropy", at, at + len(tokens))
        feeds["tokens"] = self.inputs.put("entropy", "tokens", tokens)
        with self.locks["entropy"]:
            out = self._run("entropy", feeds, len(tokens))
            return out["entropies"][0].float().cpu().numpy().copy()

    def run_encoder(self, at: int, tokens: np.ndarray) -> None:
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
        feeds = self._step_feeds("encoder", "encoder", at, at + S)
        feeds["tokens"] = self.inputs.put("encoder", "tokens", tokens)
        feeds["hash_ids"] = self.inputs.put("encoder", "hash_ids", hash_ids[0])
        with self.locks["encoder"]:
            out = self._run("encoder", feeds, S)
            self.h[at : at + S] = out["h"][0]

    def run_global(self, spans: list[tuple[int, int]], at: int) -> None:
        """Global steps over patches given as byte spans [s, e) (max_step per call); their entries go
        to patch slots at.."""
        m = self.max_step
        if len(spans) > m:
            for i in range(0, len(spans), m):
                self.run_global(spans[i : i + m], at + i)
            return
        end = at + len(spans)
        if end > self.patch_limit:
            raise InputError(
                f"sequence: {end} patches exceed the global model's limit of {self.patch_limit} patches "
                f"(reached after {spans[-1][1]} bytes); shorten the prompt or max_bytes"
            )
        L = max(e - s for s, e in spans)
        patch_bytes = torch.zeros(1, len(spans), L, self.config.encoder.dim, dtype=self.dtype, device=self.device)
        for j, (s, e) in enumerate(spans):
            patch_bytes[0, j, : e - s] = self.h[s:e]
        feeds = self._step_feeds("global", "global", at, end)
        feeds["patch_bytes"] = patch_bytes
        feeds["patch_lens"] = self.inputs.put("global", "patch_lens", [e - s for s, e in spans])
        with self.locks["global"]:
            self._run("global", feeds, len(spans))

    def run_decoder(self, at: int, S: int, read_patch: np.ndarray) -> Tensor:
        """Causal decoder over byte states h[at:at+S] -> logits (S, V); writes the decoder cache."""
        self._check_step(S, at)
        feeds = self._step_feeds("decoder", "decoder", at, at + S)
        feeds["h"] = self.h[at : at + S].unsqueeze(0)
        feeds["read_patch"] = self.inputs.put("decoder", "read_patch", read_patch)
        with self.locks["decoder"]:
            out = self._run("decoder", feeds, S)
            return out["logits"][0].to("cpu", copy=True)

    def run_block(self, block_ids: np.ndarray, read_patch: int, at: int | None = None) -> Tensor:
        """The diffusion head on a block at positions at..at+B-1 (default at = n) -> logits (B, V).

        The block attends to the committed decoder cache below `at` (at <= n) and to itself, and
        reads the latent in slot `read_patch`. Writes nothing.
        """
        at = self.n if at is None else at
        if not 0 <= at <= self.n:
            raise InputError(f"run_block: block start {at} is outside [0, {self.n}]")
        self._check_step(len(block_ids))
        feeds = self._step_feeds("decoder_block", "decoder", at, at)
        feeds["block_ids"] = self.inputs.put("decoder_block", "block_ids", block_ids)
        feeds["read_patch"] = self.inputs.put("decoder_block", "read_patch", [read_patch])
        with self.locks["decoder_block"]:
            return self._run("decoder_block", feeds, len(block_ids))["logits"][0].to("cpu", copy=True)

    # ------------------------------------------------------------------ sequence operations
    def append(self, tokens: list[int] | np.ndarray, encoded: bool = False, close_open: bool = False) -> Tensor:
        """Commit tokens at positions n..n+S-1 and return their next-byte logits (S, V).

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
            parts = [self.append(tokens[i : i + m], encoded, close_open and i + m >= S) for i in range(0, S, m)]
            return torch.cat(parts)
        self._room(at + S)
        self.tokens[at : at + S] = tokens
        if not encoded:
            self.run_encoder(at, tokens)
        ent = self.run_entropy(at, tokens)
        spans = self._mark_patches(at, ent)
        self._forced_at = None
        s_open = self.open_patch_start(at + S)
        forced = [(s_open, at + S)] if close_open and s_open < at + S else []
        if spans or forced:
            self.run_global(spans + forced, self.g_len)
            self.g_len += len(spans)
            self._forced_at = at + S if forced else None
        read = self.closed[at + 1 : at + S + 1] - 1  # the last patch closed at or before each byte
        logits = self.run_decoder(at, S, read)
        self.n = at + S
        return logits

    def _mark_patches(self, at: int, ent: np.ndarray) -> list[tuple[int, int]]:
        """Patch bookkeeping for bytes at..at+S-1; returns the spans of the patches they close."""
        spans = []
        for j, h_i in enumerate(ent):
            i = at + j
            self.entropies[i] = h_i
            self.patch_len[i] = 1 if i == 0 or self.closes[i - 1] else self.patch_len[i - 1] + 1
            self.closes[i] = closes_patch(i, float(h_i), int(self.patch_len[i]), self.config.patching)
            self.closed[i + 1] = self.closed[i] + int(self.closes[i])
            if self.closes[i]:
                spans.append((i + 1 - int(self.patch_len[i]), i + 1))
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
        self.n, self.g_len, self.written, self._forced_at = 0, 0, 0, None
        for cache in self.linear.values():
            cache.reset()

    def force_close(self) -> int:
        """The paper's block-start rule: the latent the next block reads.

        If a patch is open, run a global step on it as if it closed now and return its slot
        (g_len, which stays uncounted: the next commit overwrites it, an O(1) rollback);
        otherwise return the last closed patch.
        """
        s = self.open_patch_start()
        if s == self.n:
            return self.g_len - 1
        if self._forced_at != self.n:  # not already computed by append(close_open=True)
            self.run_global([(s, self.n)], self.g_len)
            self._forced_at = self.n
        return self.g_len
