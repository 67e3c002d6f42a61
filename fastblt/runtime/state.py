"""Host state of one sequence: tokens, entropies, patch boundaries, byte states and the static
caches of all four stacks, driven through any backend's step graphs.

Frontiers: `n` bytes are committed (every cache valid below n); `g_len` global entries are valid
(one per patch closed below n, so g_len == closed[n]). Positions >= n may hold speculative work
(drafts) that the next `append` overwrites. Rolling back is moving `n` back: O(1) besides the
bookkeeping arrays, which are indexed by position and never shifted.

Sharing a backend between threads: pass the same `lock` to every state on that backend. Each
step (run_step plus reading its outputs into this state's buffers) runs under the lock, and
every array or tensor a method returns is this state's own copy, so states on one backend can
interleave their steps. Per-state counters (`calls`, `positions`, `backend_seconds`) count only
this state's steps.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from torch import Tensor

from fastblt.engines.base import Backend
from fastblt.errors import InputError
from fastblt.export.spec import CROSS, PAST, PRESENT, TORCH_DTYPES, StepSpec, kv_from, named_kv, state_dtype
from fastblt.model.config import HASH_PRIMES, BltConfig, StackConfig
from fastblt.model.hashing import hash_ids_numpy
from fastblt.model.patching import closes_patch

KV = list[tuple[Tensor, Tensor]]


def _zeros_kv(cfg: StackConfig, length: int, dtype: torch.dtype, device: torch.device) -> KV:
    shape = (1, cfg.n_heads, length, cfg.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(cfg.n_layers)
    ]


def _write(cache: KV, out: dict[str, Tensor], at: int) -> None:
    """Copy each layer's S new entries (1, H, S, hd) into the static buffer at slots at..at+S-1."""
    for (ck, cv), (k, v) in zip(cache, kv_from(out, PRESENT, len(cache)), strict=True):
        ck[:, :, at : at + k.shape[2]].copy_(k)
        cv[:, :, at : at + v.shape[2]].copy_(v)


_U64, _I64_MIN = 1 << 64, 1 << 63
FAST_HASH_MAX = 16  # new positions up to which hashing runs in plain Python (no numpy set-up)


class IncrementalHasher:
    """Hash n-gram ids of a few new positions, bit-exact with `hash_ids_numpy` but without its
    per-call numpy set-up (the decode loop hashes one byte at a time).

    int64 wrap-around arithmetic is the exact sum taken mod 2^64 read as signed; then floor-mod.
    """

    def __init__(self, config: BltConfig):
        self.vocab = config.hash_vocab
        self.tables = [
            (n, [pow(HASH_PRIMES[f % len(HASH_PRIMES)], j, _U64) for j in range(n)])
            for f in range(config.hash_functions)
            for n in config.hash_sizes
        ]
        self.pad = max(config.hash_sizes) - 1

    def __call__(self, window: list[int], S: int) -> np.ndarray:
        """window: the pad = max_n - 1 ids before the new ones (0 = BOE where missing), then the
        S new ids -> (1, S, n_tables) int32."""
        out = np.empty((1, S, len(self.tables)), dtype=np.int32)
        for i in range(S):
            end = self.pad + i + 1  # window[:end] ends at the new id i
            for t, (n, powers) in enumerate(self.tables):
                h = sum(w * p for w, p in zip(window[end - n : end], powers, strict=True)) % _U64
                out[0, i, t] = (h - _U64 if h >= _I64_MIN else h) % self.vocab
        return out


class SequenceState:
    """One sequence (batch 1) over a backend. Not thread-safe: one state per generation call.

    Caches and byte states live on `backend.device`, so a step moves only its small feeds there
    and its new cache entries stay there; logits and entropies come back to the host.
    """

    def __init__(
        self,
        backend: Backend,
        config: BltConfig,
        capacity: int,
        patch_capacity: int,
        lock: contextlib.AbstractContextManager | None = None,
    ):
        if config.entropy is None:
            raise InputError("checkpoint: the runtime needs an entropy model to patch")
        self.backend, self.config = backend, config
        self.capacity, self.patch_capacity = capacity, patch_capacity
        specs: dict[str, StepSpec] = backend.specs
        dtype = TORCH_DTYPES[state_dtype(specs)]
        self.dtype, self.device = dtype, backend.device
        dev = self.device
        self.caches = {
            "entropy": _zeros_kv(config.entropy, capacity, dtype, dev),
            "encoder": _zeros_kv(config.encoder, capacity, dtype, dev),
            "global": _zeros_kv(config.global_model, patch_capacity, dtype, dev),
            "decoder": _zeros_kv(config.decoder, capacity, dtype, dev),
        }
        cross_shape = (1, patch_capacity, config.cross_attn_k, config.decoder.dim)
        self.cross: KV = [
            (torch.zeros(cross_shape, dtype=dtype, device=dev), torch.zeros(cross_shape, dtype=dtype, device=dev))
            for _ in range(config.decoder_cross_layers)
        ]
        self.tokens = np.zeros(capacity, dtype=np.int64)
        self.entropies = np.zeros(capacity, dtype=np.float32)
        self.closes = np.zeros(capacity, dtype=bool)  # byte i ends its patch
        self.closed = np.zeros(capacity + 1, dtype=np.int64)  # closed[i]: patches closed at bytes < i
        self.patch_len = np.zeros(capacity, dtype=np.int64)  # bytes of i's patch up to and including i
        self.h = torch.zeros(capacity, config.encoder.dim, dtype=dtype, device=dev)  # encoder byte states
        self.hasher = IncrementalHasher(config)
        self.n = 0
        self.g_len = 0
        self._forced_at: int | None = None  # n at which slot g_len holds the open patch's forced latent
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zero this state's per-step counters (calls, positions run, backend seconds)."""
        self.calls: dict[str, int] = dict.fromkeys(self.backend.specs, 0)
        self.positions: dict[str, int] = dict.fromkeys(self.backend.specs, 0)
        self.backend_seconds = 0.0

    def _run(self, step: str, feeds: dict[str, Tensor], positions: int) -> dict[str, Tensor]:
        """run_step + this state's counters; call with self.lock held (outputs are shared)."""
        t0 = time.perf_counter()
        out = self.backend.run_step(step, feeds, check=False)
        self.backend_seconds += time.perf_counter() - t0
        self.calls[step] += 1
        self.positions[step] += positions
        return out

    # ------------------------------------------------------------------ helpers
    def _start(self, at: int) -> Tensor:
        return self._ids([at])

    def _ids(self, values: np.ndarray | list[int]) -> Tensor:
        """Host ints -> an int32 tensor of the same shape on the backend's device."""
        x = torch.from_numpy(np.asarray(values, dtype=np.int32))
        return x if self.device.type == "cpu" else x.to(self.device, non_blocking=True)

    def _need_room(self, end: int) -> None:
        if end > self.capacity:
            raise InputError(f"sequence: {end} bytes exceed the cache capacity of {self.capacity}")

    def open_patch_start(self, n: int | None = None) -> int:
        """First byte of the patch still open after n committed bytes (== n if none is open)."""
        n = self.n if n is None else n
        return n - int(self.patch_len[n - 1]) if n > 0 and not self.closes[n - 1] else n

    # ------------------------------------------------------------------ the four stacks
    def run_entropy(self, at: int, tokens: np.ndarray) -> np.ndarray:
        feeds = {"tokens": self._ids(tokens).view(1, -1), "start": self._start(at)}
        feeds |= named_kv(PAST, self.caches["entropy"])
        with self.lock:
            out = self._run("entropy", feeds, len(tokens))
            _write(self.caches["entropy"], out, at)
            return out["entropies"][0].float().cpu().numpy().copy()

    def run_encoder(self, at: int, tokens: np.ndarray) -> None:
        """Encoder states for tokens placed at positions at.. (writes self.h and the encoder cache)."""
        self._need_room(at + len(tokens))
        self.tokens[at : at + len(tokens)] = tokens
        pad = self.hasher.pad
        history = self.tokens[max(0, at - pad) : at]
        if len(tokens) <= FAST_HASH_MAX:
            window = [0] * (pad - len(history)) + history.tolist() + tokens.tolist()
            hash_ids = self.hasher(window, len(tokens))
        else:
            hash_ids = hash_ids_numpy(tokens.reshape(1, -1), self.config, history.reshape(1, -1))
        feeds = {
            "tokens": self._ids(tokens).view(1, -1),
            "hash_ids": self._ids(hash_ids),
            "start": self._start(at),
        }
        feeds |= named_kv(PAST, self.caches["encoder"])
        with self.lock:
            out = self._run("encoder", feeds, len(tokens))
            _write(self.caches["encoder"], out, at)
            self.h[at : at + len(tokens)] = out["h"][0]

    def run_global(self, spans: list[tuple[int, int]], at: int) -> None:
        """One global step over patches given as byte spans [s, e); entries written at slot `at`."""
        if at + len(spans) > self.patch_capacity:
            raise InputError(f"sequence: {at + len(spans)} patches exceed the patch capacity {self.patch_capacity}")
        L = max(e - s for s, e in spans)
        patch_bytes = torch.zeros(1, len(spans), L, self.config.encoder.dim, dtype=self.dtype, device=self.device)
        for j, (s, e) in enumerate(spans):
            patch_bytes[0, j, : e - s] = self.h[s:e]
        feeds = {
            "patch_bytes": patch_bytes,
            "patch_lens": self._ids([e - s for s, e in spans]).view(1, -1),
            "start": self._start(at),
        }
        feeds |= named_kv(PAST, self.caches["global"])
        with self.lock:
            out = self._run("global", feeds, len(spans))
            _write(self.caches["global"], out, at)
            for (ck, cv), (k, v) in zip(self.cross, kv_from(out, CROSS, len(self.cross)), strict=True):
                ck[:, at : at + len(spans)] = k
                cv[:, at : at + len(spans)] = v

    def run_decoder(self, at: int, S: int, read_patch: np.ndarray) -> Tensor:
        """Causal decoder over byte states h[at:at+S] -> logits (S, V); writes the decoder cache."""
        feeds = {
            "h": self.h[at : at + S].unsqueeze(0),
            "read_patch": self._ids(read_patch).view(1, -1),
            "start": self._start(at),
        }
        feeds |= named_kv(PAST, self.caches["decoder"])
        feeds |= named_kv(CROSS, self.cross)
        with self.lock:
            out = self._run("decoder", feeds, S)
            _write(self.caches["decoder"], out, at)
            return out["logits"][0].to("cpu", copy=True)

    def run_block(self, block_ids: np.ndarray, read_patch: int, at: int | None = None) -> Tensor:
        """The diffusion head on a block at positions at..at+B-1 (default at = n) -> logits (B, V).

        The block attends to the committed decoder cache below `at` (at <= n) and to itself, and
        reads the latent in slot `read_patch`. Writes nothing.
        """
        at = self.n if at is None else at
        if not 0 <= at <= self.n:
            raise InputError(f"run_block: block start {at} is outside [0, {self.n}]")
        self._need_room(at + len(block_ids))
        feeds = {
            "block_ids": self._ids(block_ids).view(1, -1),
            "start": self._start(at),
            "read_patch": self._ids([read_patch]),
        }
        feeds |= named_kv(PAST, self.caches["decoder"])
        feeds |= named_kv(CROSS, self.cross)
        with self.lock:
            return self._run("decoder_block", feeds, len(block_ids))["logits"][0].to("cpu", copy=True)

    # ------------------------------------------------------------------ sequence operations
    def append(self, tokens: list[int] | np.ndarray, encoded: bool = False, close_open: bool = False) -> Tensor:
        """Commit tokens at positions n..n+S-1 and return their next-byte logits (S, V).

        Runs the entropy step, the encoder step (skipped when `encoded`: drafting already wrote
        these positions' encoder states, which do not depend on patching), one global step for
        every patch the new bytes close, and the causal decoder step.

        close_open: also force-close the patch left open after these bytes in the same global
        step (what `force_close` would do next, without a pass of its own); its latent sits
        uncounted in slot g_len and `force_close` returns it while nothing else has changed.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        S, at = len(tokens), self.n
        if S == 0:
            raise InputError("append: no tokens")
        self._need_room(at + S)
        if not encoded:
            self.run_encoder(at, tokens)
        self.tokens[at : at + S] = tokens
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
        """Forget everything at positions >= n (O(1): frontiers move, buffers stay)."""
        if not 0 <= n <= self.n:
            raise InputError(f"rollback: {n} is outside [0, {self.n}]")
        if n != self.n:
            self._forced_at = None
        self.n = n
        self.g_len = int(self.closed[n])

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
