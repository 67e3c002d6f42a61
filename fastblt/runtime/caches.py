"""Where the caches live: rows of ring caches that step together, and growing linear caches.

`RowCaches` holds the ring caches of the windowed stacks (the default's entropy model, encoder and
decoder) and the decoder's cross ring for up to `rows` sequences, one (rows, ...) buffer per tensor: a contiguous
range of rows is then one batched step call with no copy. A sequence on its own is a RowCaches of
one row. `LinearCache` is one sequence's cache of an unwindowed stack (the global transformer),
sized to its own context, so memory follows each sequence's length rather than the longest one's.
"""

from __future__ import annotations

import math
import mmap

import numpy as np
import torch
from torch import Tensor

from fastblt.export.spec import CROSS, PAST, PAST_BUCKET, StepSpec, cross_slots, max_step, named_kv, past_slots
from fastblt.machine import memory_available
from fastblt.model.config import BltConfig, StackConfig

KV = list[tuple[Tensor, Tensor]]
HostKV = list[tuple[np.ndarray, np.ndarray]]


MIRROR_SHARE = 0.25  # of the memory available, what one growth of a batch's global-cache mirror may take


def available_memory(device: torch.device) -> int | None:
    """Bytes free where a buffer on `device` lives: the GPU's, or what this process may still use
    of the host's (machine.memory_available); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return memory_available()


def host_arrays(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the host side works on numpy views of these buffers (a sequence's byte states and
    float inputs, the outputs it reads, the caches a batch gathers). On the host it does: right
    after a step call has evicted the core's caches a small torch call costs 10-20 us and a numpy
    one ~2 us, and a byte's host time was mostly such calls. Not for CUDA (the buffers stay on the
    device) or bfloat16 (numpy has none)."""
    return device.type == "cpu" and dtype in (torch.float32, torch.float16)


def buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, populate: bool = False) -> Tensor:
    """A zeroed buffer. On the host, its own anonymous memory map: a cache that grows replaces its
    buffers every few patches, and unmapping gives the old ones back to the system at once, where
    the C heap would keep them (fragmented) and the process would grow by more than it holds.
    `populate`: its pages are mapped in one call now (for a buffer about to be filled): faulting
    them in one by one as a copy first touches them cost more than the copy."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.finfo(dtype).bits // 8
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    memory = mmap.mmap(-1, max(nbytes, 1), flags=flags)
    return torch.frombuffer(memory, dtype=dtype, count=math.prod(shape)).view(shape)


def zeros_kv(cfg: StackConfig, rows: int, slots: int, dtype: torch.dtype, device: torch.device) -> KV:
    shape = (rows, cfg.n_heads, slots, cfg.head_dim)
    return [(buffer(shape, dtype, device), buffer(shape, dtype, device)) for _ in range(cfg.n_layers)]


def resize_kv(kv: KV, slots: int, dtype: torch.dtype, device: torch.device, rows: int | None = None) -> None:
    """Replace each (rows, heads, old, d) buffer of `kv` by a (rows, heads, slots, d) one holding
    its first slots (and its first `rows` rows: None keeps them all), one buffer at a time: the
    copy needs one layer's worth of extra memory, not a model's."""
    for i, pair in enumerate(kv):
        new = []
        for old in pair:
            r = old.shape[0] if rows is None else rows
            buf = buffer((r, old.shape[1], slots, old.shape[3]), dtype, device, populate=True)
            n, m = min(slots, old.shape[2]), min(r, old.shape[0])
            buf[:m, :, :n].copy_(old[:m, :, :n])
            new.append(buf)
        kv[i] = (new[0], new[1])
        del pair, new


def packed(tensors: list[Tensor]) -> list[Tensor]:
    """Copies of `tensors` (one dtype and device) in one buffer of their own: a prompt snapshot is a
    few dozen small tensors, and mapping a buffer per tensor cost more than copying them."""
    flat = buffer((sum(t.numel() for t in tensors),), tensors[0].dtype, tensors[0].device, populate=True)
    out, at = [], 0
    for t in tensors:
        out.append(flat[at : at + t.numel()].view(t.shape))
        out[-1].copy_(t)
        at += t.numel()
    return out


def copy_slots(dst: KV, src: KV, n: int) -> None:
    """Copy the first n slots of every (k, v) buffer of `src` into `dst`."""
    for (k, v), (sk, sv) in zip(dst, src, strict=True):
        k[..., :n, :].copy_(sk[..., :n, :])
        v[..., :n, :].copy_(sv[..., :n, :])


def stack_configs(config: BltConfig) -> dict[str, StackConfig]:
    """The four self-attention stacks by cache name (export/spec.py STACKS)."""
    assert config.entropy is not None
    return {"entropy": config.entropy, "encoder": config.encoder, "global": config.global_model,
            "decoder": config.decoder}  # fmt: skip


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def kv_bytes(kv: KV) -> int:
    return sum(k.nbytes + v.nbytes for k, v in kv)


class RowCaches:
    """Ring and cross caches of `rows` sequences; row r of every buffer belongs to one sequence.

    A ring needs no clearing when a row changes hands: a new sequence writes every position from 0
    before it reads it, and a slot whose position is not yet written is masked by position.
    """

    def __init__(self, specs: dict[str, StepSpec], config: BltConfig, rows: int, dtype: torch.dtype,
                 device: torch.device):  # fmt: skip
        self.rows = rows
        self.rings: dict[str, KV] = {}
        for name, cfg in stack_configs(config).items():
            slots = specs[name].slots
            if isinstance(slots, int):  # an unwindowed stack has a LinearCache per sequence instead
                self.rings[name] = zeros_kv(cfg, rows, slots, dtype, device)
        shape = (rows, 1, cross_slots(max_step(specs)), config.cross_attn_k * config.decoder.dim)
        self.cross: KV = [(buffer(shape, dtype, device), buffer(shape, dtype, device))
                          for _ in range(config.decoder_cross_layers)]  # fmt: skip
        host = host_arrays(device, dtype)
        self.cross_host: HostKV | None = [(k.numpy(), v.numpy()) for k, v in self.cross] if host else None
        self._feeds: dict[tuple, dict[str, Tensor]] = {}

    def feeds(self, stack: str | None, cross: bool, lo: int, hi: int) -> dict[str, Tensor]:
        """Named cache inputs of rows lo..hi-1: the stack's ring (`past.*`; None: none) and, with
        `cross`, the cross ring (`cross.*`). Memoised: the views of a range never change."""
        key = (stack, cross, lo, hi)
        feeds = self._feeds.get(key)
        if feeds is None:
            feeds = named_kv(PAST, self.ring(stack, lo, hi)) if stack is not None else {}
            if cross:
                feeds |= named_kv(CROSS, self.cross_rows(lo, hi))
            self._feeds[key] = feeds
        return feeds

    def ring(self, stack: str, lo: int, hi: int) -> KV:
        """Rows lo..hi-1 of a stack's ring (views: a step writes them in place)."""
        return [(k[lo:hi], v[lo:hi]) for k, v in self.rings[stack]]

    def cross_rows(self, lo: int, hi: int) -> KV:
        return [(k[lo:hi], v[lo:hi]) for k, v in self.cross]

    def cross_rows_host(self, lo: int, hi: int) -> KV | HostKV:
        """Rows lo..hi-1 of the cross ring as the host copies them (numpy views where host_arrays)."""
        return [(k[lo:hi], v[lo:hi]) for k, v in (self.cross_host or self.cross)]

    def move(self, src: int, dst: int) -> None:
        """Copy row src into row dst (a batch keeps its live rows first)."""
        for t in self._buffers():
            t[dst].copy_(t[src])

    def row(self, row: int) -> list[Tensor]:
        """Row `row` of every ring and cross buffer (views), in the order `load_row` takes them."""
        return [t[row] for t in self._buffers()]

    def load_row(self, row: int, saved: list[Tensor]) -> None:
        """Write copies of another RowCaches' `row` (of the same specs) into row `row`."""
        for t, s in zip(self._buffers(), saved, strict=True):
            t[row].copy_(s)

    def _buffers(self) -> list[Tensor]:
        return [t for kv in (*self.rings.values(), self.cross) for pair in kv for t in pair]

    def row_bytes(self) -> int:
        """Bytes one row holds."""
        return (sum(kv_bytes(kv) for kv in self.rings.values()) + kv_bytes(self.cross)) // self.rows


class LinearCache:
    """An unwindowed stack's cache: buffers (1, heads, slots, head_dim) per layer holding the live
    prefix rounded up (spec.past_slots), grown (copied into larger buffers) as the sequence
    reaches a new bucket, so memory and a step's cost follow the context. A prefix along the slot
    axis of a (heads, slots) buffer is not contiguous, so the buffers are sized to it instead.

    In a batch the cache may be lent to a row of the batch's MirrorRows: its buffers are then that
    row (views, `lent`), so the batch holds each sequence's cache once."""

    def __init__(self, cfg: StackConfig, dtype: torch.dtype, device: torch.device):
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.limit = round_up(cfg.max_positions, PAST_BUCKET)
        self.kv = zeros_kv(cfg, 1, PAST_BUCKET, dtype, device)
        self._feeds: dict[str, Tensor] | None = None
        self._numpy = host_arrays(device, dtype)
        self._host: HostKV | None = None
        self.lent: tuple[MirrorRows, int] | None = None  # the mirror and row its buffers are

    @property
    def slots(self) -> int:
        return self.kv[0][0].shape[2]

    def host(self) -> KV | HostKV:
        """The buffers as the host copies them (numpy views where host_arrays), until next replaced."""
        if not self._numpy:
            return self.kv
        if self._host is None:
            self._host = [(k.numpy(), v.numpy()) for k, v in self.kv]
        return self._host

    def nbytes(self) -> int:
        return kv_bytes(self.kv)

    def for_step(self, end: int) -> KV:
        """The buffers, holding at least `end` slots (grown first when needed: a lent cache grows
        its mirror, or takes its slots back where the mirror may not grow)."""
        if end > self.slots and (self.lent is None or not self.lent[0].reserve(end)):
            self.take_back(end)
            self._resize(min(past_slots(end), self.limit))
        return self.kv

    def feeds(self) -> dict[str, Tensor]:
        """The buffers as named cache inputs (`past.*`), until they are next replaced."""
        if self._feeds is None:
            self._feeds = named_kv(PAST, self.kv)
        return self._feeds

    def reset(self) -> None:
        """Back to one bucket of its own (a new sequence)."""
        if self._detach() is not None or self.slots != PAST_BUCKET:
            self._use(zeros_kv(self.cfg, 1, PAST_BUCKET, self.dtype, self.device))

    def copy_from(self, other: LinearCache | KV, upto: int) -> None:
        """Hold the slots below `upto` of `other` (another sequence's cache, or a prompt snapshot's
        copy of one) in buffers of its own."""
        self.reset()
        if upto > self.slots:
            self._resize(min(past_slots(upto), self.limit))
        copy_slots(self.kv, other.kv if isinstance(other, LinearCache) else other, upto)

    def prefix(self, upto: int) -> KV:
        """Its slots below `upto` (views)."""
        return [(k[:, :, :upto], v[:, :, :upto]) for k, v in self.kv]

    def take_back(self, upto: int | None = None) -> None:
        """A lent cache gets buffers of its own again, holding its row's slots below `upto` (None:
        every slot of the row; a sequence reads none from its `free_slot` on)."""
        mirror = self._detach()
        if mirror is None:
            return
        n = mirror.cap if upto is None else min(upto, mirror.cap)
        own = zeros_kv(self.cfg, 1, min(past_slots(max(n, 1)), self.limit), self.dtype, self.device)
        copy_slots(own, self.kv, n)
        self._use(own)

    def _detach(self) -> MirrorRows | None:
        """No longer lent: the mirror it was lent to (its row now lent to no one), or None."""
        if self.lent is None:
            return None
        mirror, row = self.lent
        mirror.owners[row] = None
        self.lent = None
        return mirror

    def _use(self, kv: KV) -> None:
        """Its buffers are now `kv` (the old ones are let go, with the views made of them)."""
        self._feeds = self._host = None
        self.kv = kv

    def _resize(self, slots: int) -> None:
        self._feeds = self._host = None  # hold no old buffer while it is replaced
        resize_kv(self.kv, slots, self.dtype, self.device)


class MirrorRows:
    """A batch's linear caches of one stack in one (rows, heads, cap, head_dim) buffer per tensor,
    so that a step over a range of rows reads them as one contiguous slice instead of gathering
    each sequence's cache into a scratch (a copy that grows with the context: 15-20% of a batch
    lane's time at 512-2,048 bytes out).

    A sequence's cache is lent to the row it steps in (`sync`: copied in once, its own buffers let
    go), and is that row from then on: steps write it in place, a step that gathers reads and
    writes it there too, so the batch holds each cache once. A sequence the batch moves to another
    row takes its lent row along (`move`); a row another sequence needs while a cache is still lent
    to it first gives that cache its own buffers back. `cap` grows to the longest row's need
    (never past the stack's position limit, rounded to a bucket), and `rows` to the rows the
    batch's live sequences hold (its first ones), up to `max_rows`.
    """

    def __init__(self, cfg: StackConfig, max_rows: int, dtype: torch.dtype, device: torch.device):
        self.cfg, self.max_rows, self.dtype, self.device = cfg, max_rows, dtype, device
        self.limit = round_up(cfg.max_positions, PAST_BUCKET)
        self.kv = zeros_kv(cfg, 1, PAST_BUCKET, dtype, device)
        self._feeds: dict[tuple[int, int], dict[str, Tensor]] = {}
        self.owners: list[LinearCache | None] = [None] * max_rows  # the cache lent to each row

    @property
    def cap(self) -> int:
        return self.kv[0][0].shape[2]

    @property
    def rows(self) -> int:
        return self.kv[0][0].shape[0]

    def nbytes(self) -> int:
        return kv_bytes(self.kv)

    def reserve(self, end: int, rows: int = 1) -> bool:
        """Make room for `end` slots in rows 0..rows-1 (rows grow by doubling: a batch's live rows
        come first, and a row that no request uses holds no memory); False when that is past the
        position limit, or when growing would take more than MIRROR_SHARE of the memory available
        (every row grows, used or not: past that the batch gathers its callers' caches instead)."""
        if end > self.limit or rows > self.max_rows:
            return False
        if end > self.cap or rows > self.rows:
            slots = max(self.cap, min(past_slots(end), self.limit))
            n = max(self.rows, min(1 << (rows - 1).bit_length(), self.max_rows))
            grow = self.nbytes() * (n * slots - self.rows * self.cap) // (self.rows * self.cap)
            free = available_memory(self.device)
            if free is not None and grow > MIRROR_SHARE * free:
                return False
            self._resize(n, slots)
        return True

    def fit(self, end: int, rows: int) -> None:
        """Shrink to `end` slots and `rows` rows (rounded up) once either is under half of what the
        buffers hold: they cover what every live row reads, and a call attends over every slot of
        the mirror (masked), so a mirror still sized to a request that has left would slow every
        global step and hold its memory."""
        slots = min(past_slots(max(end, 1)), self.limit)
        n = min(1 << (max(rows, 1) - 1).bit_length(), self.max_rows)
        if 2 * slots <= self.cap or 2 * n <= self.rows:
            self._resize(n if 2 * n <= self.rows else self.rows, slots if 2 * slots <= self.cap else self.cap)

    def _resize(self, rows: int, slots: int) -> None:
        for row in range(rows, self.rows):
            self.release(row)  # rows that go: a cache lent to one gets its own buffers back
        self._feeds = {}
        resize_kv(self.kv, slots, self.dtype, self.device, rows)
        for row, cache in enumerate(self.owners):
            if cache is not None:
                cache._use(self._row(row))

    def _row(self, row: int) -> KV:
        return [(k[row : row + 1], v[row : row + 1]) for k, v in self.kv]

    def feeds(self, lo: int, hi: int) -> dict[str, Tensor]:
        """Rows lo..hi-1 as named cache inputs (`past.*`), written in place by the step."""
        feeds = self._feeds.get((lo, hi))
        if feeds is None:
            feeds = self._feeds[lo, hi] = named_kv(PAST, [(k[lo:hi], v[lo:hi]) for k, v in self.kv])
        return feeds

    def sync(self, row: int, cache: LinearCache, upto: int) -> None:
        """Lend `cache` to row `row`, its slots below `upto` copied in (from its own buffers, or
        from the row it was lent to before); nothing to do when it is lent there already."""
        if self.owners[row] is cache:
            return
        self.release(row)
        if cache.lent is not None and cache.lent[0] is not self:
            cache.take_back()
        copy_slots(self._row(row), cache.kv, min(upto, cache.slots))  # its own buffers, or its old row
        cache._detach()
        self.owners[row] = cache
        cache.lent = (self, row)
        cache._use(self._row(row))

    def move(self, src: int, dst: int, upto: int) -> None:
        """The sequence in row `src` moves to row `dst` (the batch keeps its live rows first): the
        cache lent to `src` is copied below slot `upto` (its sequence's `free_slot`) and lent to
        `dst`, with no buffers of its own in between."""
        cache = self.owners[src]
        if cache is None:
            return
        if self.reserve(1, dst + 1):
            self.sync(dst, cache, upto)
        else:  # no room for row dst: the cache gets its own buffers back
            cache.take_back(upto)

    def lend(self, row: int, cache: LinearCache) -> None:
        """Row `row` is written past what `cache` reads (a padding row): a cache lent to it by
        another sequence takes its slots back first."""
        if self.owners[row] is not cache:
            self.release(row)

    def release(self, row: int | None = None) -> None:
        """The cache lent to row `row` (None: to every row) gets its own buffers back."""
        for r in range(len(self.owners)) if row is None else (row,):
            cache = self.owners[r]
            if cache is not None:
                cache.take_back()
