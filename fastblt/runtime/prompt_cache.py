"""Prompt snapshots: a committed prompt kept so that the next request with that prompt starts from
it instead of committing it again (a retry, another sample, another mode, the same document with
another short question after it).

A prompt of n ids (BOS first) is committed in chunks from position 0, in two parts: the positions
below `cut(n, chunk)`, the last chunk boundary before its end, then the rest (loops.generate), each
part in as few global steps as it can. The sequence at the cut is therefore the same whatever
follows it, and a request whose prompt has the same ids below the same cut (the same prompt, or
one that differs only after the cut) loads a snapshot of it (SequenceState.load) and commits the
rest: the same step calls on the same inputs as its own prefill, so the same bytes. Prompts that
extend a cached one past its cut commit the whole prompt (their prefill groups its global steps
across that boundary).

Snapshots are kept least recently used first out, within a budget in bytes; each holds a row of the
ring caches (~1.5 MB for the default checkpoint), the global cache up to the cut (~10 KB per patch)
and the byte states, in buffers of its own. Not kept: prompts with fewer than MIN_CUT positions
before their cut (their prefill costs little more than a snapshot), snapshots over a quarter of the
budget (one long prompt would push out several; ~4 KB of code at the default 64 MB), and
requests that score their prompt (prompt_logprobs needs every position's logits).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fastblt.errors import InputError

if TYPE_CHECKING:  # the CLI reads DEFAULT_MB without loading torch
    from fastblt.runtime.state import Snapshot

MIN_CUT = 128  # positions before the cut below which a prompt is not kept
DEFAULT_MB = 64  # per engine (per lane): ~14 snapshots of 1,000-byte prompts on the default checkpoint


def cut(n: int, chunk: int) -> int:
    """Where a prompt of n ids is split: the last multiple of `chunk` below n (0 when n <= chunk)."""
    return (n - 1) // chunk * chunk


def prompt_key(ids: list[int], chunk: int) -> bytes | None:
    """What identifies a prompt's snapshot: the chunk and the ids below its cut (None: too short)."""
    q = cut(len(ids), chunk)
    if q < MIN_CUT:
        return None
    return chunk.to_bytes(4, "little") + np.asarray(ids[:q], dtype=np.uint16).tobytes()


def check_budget(mb: object) -> float:
    """The budget in MB as a float; InputError naming `prompt_cache_mb` when it is not a number >= 0."""
    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not mb >= 0 or mb == float("inf"):
        raise InputError(f"prompt_cache_mb: expected a number of MB >= 0 (0: no prompt cache), got {mb!r}")
    return float(mb)


@dataclass
class CacheStats:
    """What a PromptCache has done (monotonic counters) and holds now."""

    hits: int = 0  # requests that loaded a snapshot
    misses: int = 0  # requests that could have (a long enough prompt) and found none
    stored: int = 0
    evicted: int = 0
    entries: int = 0
    bytes: int = 0
    positions: int = 0  # prompt positions loaded instead of committed, over all hits


class PromptCache:
    """Snapshots by (chunk, the prompt's ids below its cut), within `budget_mb`; thread-safe."""

    def __init__(self, budget_mb: float = DEFAULT_MB):
        self.budget = int(check_budget(budget_mb) * 2**20)
        self.stats = CacheStats()
        self._entries: OrderedDict[bytes, Snapshot] = OrderedDict()
        self._lock = threading.Lock()

    def key(self, ids: list[int], chunk: int) -> bytes | None:
        """The key of a prompt's snapshot, or None when the cache is off or the prompt too short."""
        return prompt_key(ids, chunk) if self.budget else None

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._entries

    def peek(self, key: bytes) -> Snapshot | None:
        """The snapshot under `key`, if any, as it is: no hit or miss counted, its place unchanged."""
        with self._lock:
            return self._entries.get(key)

    def wants(self, key: bytes, size: int) -> bool:
        """Whether a snapshot of `size` bytes under `key` would be kept (none is yet, and it is at
        most a quarter of the budget): asked before a snapshot is taken."""
        with self._lock:
            return key not in self._entries and size <= self.budget // 4

    def get(self, key: bytes) -> Snapshot | None:
        """The snapshot stored under `key` (now the most recently used), or None."""
        with self._lock:
            snap = self._entries.get(key)
            if snap is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            self.stats.positions += snap.n
            return snap

    def put(self, key: bytes, snap: Snapshot) -> None:
        """Keep `snap` under `key` (unless `wants` says no), letting the least recently used go
        until it fits the budget."""
        size = snap.nbytes()
        if not self.wants(key, size):
            return
        with self._lock:
            while self.stats.bytes + size > self.budget:
                _, old = self._entries.popitem(last=False)
                self.stats.bytes -= old.nbytes()
                self.stats.evicted += 1
            self._entries[key] = snap
            self.stats.bytes += size
            self.stats.stored += 1
            self.stats.entries = len(self._entries)

    def clear(self) -> None:
        """Let every snapshot go."""
        with self._lock:
            self._entries.clear()
            self.stats.bytes = self.stats.entries = 0
