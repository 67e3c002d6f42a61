"""Prompt snapshots: a committed prompt kept so that a later request whose prompt begins with it
starts from it instead of committing it again (a retry, another sample or mode, a conversation's
next turn, another question after the same document).

A prompt of n ids (BOS first) is committed in chunks from position 0, in parts split at fixed
points (`split_points`): every multiple of the stride (256 positions, rounded up to whole chunks)
below its cut, and its cut, the last chunk boundary before its end; each part in as few global
steps as it can (loops.generate). So the sequence at a split point is the same whatever follows
it, and a request whose prompt has the same ids below one of its own split points loads a
snapshot taken there (SequenceState.load) and commits the rest: the same step calls on the same
inputs as its own prefill, so the same bytes.

A request keeps snapshots at its two deepest split points: its cut (the same prompt again) and the
stride point below it (a prompt extending this one, say the next turn of a conversation, which
shares the ids below that point but not the cut). They are kept least recently used first out
within a budget in bytes; each holds a row of the ring caches (~1.5 MB for the default
checkpoint), the global cache up to its point (~10 KB per patch) and the byte states, in buffers
of its own. Not kept: points below MIN_CUT positions (their prefill costs little more than a
snapshot) and snapshots over a quarter of the budget (one long prompt would push out several;
~4 KB of code at the default 64 MB). A request that scores its prompt (prompt_logprobs: every
position's scores) keeps them with its snapshots and loads only snapshots that carry them, with at
least its number of top ids; a snapshot with more replaces one kept with fewer or none.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fastblt.errors import InputError

if TYPE_CHECKING:  # the CLI reads DEFAULT_MB without loading torch
    from fastblt.runtime.state import Snapshot

MIN_CUT = 128  # positions below which no snapshot is kept
STRIDE = 256  # positions between a prompt's fixed split points (rounded up to whole chunks): splitting
# prompts of 1,000 to 8,000 bytes at every 512, 256 or 128 positions changed their commit time by less than
# the noise; the next turn of a conversation recommits on average half a stride of the last prompt
DEFAULT_MB = 64  # per engine (per lane): ~16 snapshots of 1,000-byte prompts (two a prompt) on the default


def cut(n: int, chunk: int) -> int:
    """The last multiple of `chunk` below n (0 when n <= chunk): where a prompt of n ids is split last."""
    return (n - 1) // chunk * chunk


def split_points(n: int, chunk: int) -> list[int]:
    """Where a prompt of n ids is split, ascending: every multiple of the stride below its cut, then
    its cut (none when n <= chunk). The stride points depend on the chunk alone, so prompts that
    pass one are split alike below it."""
    q = cut(n, chunk)
    stride = -(-STRIDE // chunk) * chunk
    return [*range(stride, q, stride), q] if q else []


def prompt_keys(ids: list[int], chunk: int) -> list[tuple[int, bytes]]:
    """(split point, key) of each snapshot a prompt could load, deepest first. A key is a digest
    of the chunk and the ids below its point, all of a prompt's in one pass over its ids; a
    snapshot found by one is used only if its own ids are the prompt's (`PromptCache.find`)."""
    points = [p for p in split_points(len(ids), chunk) if p >= MIN_CUT]
    if not points:
        return []
    data = np.asarray(ids[: points[-1]], dtype=np.uint16).tobytes()
    digest, keys, at = hashlib.blake2b(chunk.to_bytes(4, "little"), digest_size=16), [], 0
    for p in points:
        digest.update(data[2 * at : 2 * p])
        keys.append((p, digest.copy().digest()))
        at = p
    return keys[::-1]


def check_budget(mb: object) -> float:
    """The budget in MB as a float; InputError naming `prompt_cache_mb` when it is not a number >= 0."""
    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not mb >= 0 or mb == float("inf"):
        raise InputError(f"prompt_cache_mb: expected a number of MB >= 0 (0: no prompt cache), got {mb!r}")
    return float(mb)


@dataclass
class CacheStats:
    """What a PromptCache has done (monotonic counters) and holds now."""

    hits: int = 0  # requests that loaded a snapshot
    shared_hits: int = 0  # of those, snapshots another lane kept (SharedSnapshots)
    misses: int = 0  # requests that looked for one and found none
    stored: int = 0
    evicted: int = 0
    entries: int = 0
    bytes: int = 0
    positions: int = 0  # prompt positions loaded instead of committed, over all hits


@dataclass
class PromptScores:
    """The scores of a snapshot's prompt ids after BOS (Output.score_prompt's, from the rows that
    committed them), each with its `top_n` most likely ids: a request scoring its prompt with as
    many or fewer takes them, cut to its own (their order is the ranking's)."""

    logprobs: np.ndarray  # (n,) float64
    top_ids: np.ndarray  # (n, top_n) int32
    top_logprobs: np.ndarray  # (n, top_n) float64

    @property
    def top_n(self) -> int:
        return self.top_ids.shape[1]

    @staticmethod
    def size(n: int, top_n: int) -> int:
        return n * (8 + 12 * top_n)

    @classmethod
    def of(cls, logprobs: list[float], tops: list[dict[int, float]], top_n: int) -> PromptScores:
        shape = (len(tops), top_n)
        return cls(np.asarray(logprobs, dtype=np.float64),
                   np.asarray([list(t) for t in tops], dtype=np.int32).reshape(shape),
                   np.asarray([list(t.values()) for t in tops], dtype=np.float64).reshape(shape))  # fmt: skip

    def lists(self, top_n: int) -> tuple[list[float], list[dict[int, float]]]:
        """(logprobs, top logprobs) as Output holds them, each top cut to `top_n`."""
        ids, lps = self.top_ids[:, :top_n].tolist(), self.top_logprobs[:, :top_n].tolist()
        return self.logprobs.tolist(), [dict(zip(i, lp, strict=True)) for i, lp in zip(ids, lps, strict=True)]


@dataclass
class Kept:
    """A snapshot and, when the request that took it scored its prompt, those scores."""

    snap: Snapshot
    scores: PromptScores | None = None

    @property
    def rank(self) -> int:
        """Which requests it serves: -1 those that do not score their prompt, else those scoring
        it with at most `rank` top ids."""
        return -1 if self.scores is None else self.scores.top_n

    def nbytes(self) -> int:
        scores = self.scores
        return self.snap.nbytes() + (0 if scores is None else PromptScores.size(len(scores.logprobs), scores.top_n))


class SharedSnapshots(Protocol):
    """Where the other lanes of an engine keep their snapshots (prompt_share.SnapshotFiles)."""

    def publish(self, key: bytes, kept: Kept) -> Kept | None: ...
    def find(self, key: bytes, top_n: int | None = None) -> Kept | None: ...
    def serves(self, key: bytes, rank: int) -> bool: ...
    def touched(self, key: bytes) -> float: ...
    def remove(self, key: bytes) -> None: ...


class PromptCache:
    """Snapshots by key (prompt_keys), within `budget_mb`; thread-safe. With `shared` (a worker
    lane's), each kept snapshot is also published to the engine's other lanes, and a key missing
    here is looked for among theirs."""

    def __init__(self, budget_mb: float = DEFAULT_MB, shared: SharedSnapshots | None = None):
        self.budget = int(check_budget(budget_mb) * 2**20)
        self.shared = shared
        self.stats = CacheStats()
        self._entries: OrderedDict[bytes, Kept] = OrderedDict()
        self._used: dict[bytes, float] = {}  # when this cache last stored or found each key (time.time)
        self._lock = threading.Lock()

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._entries

    def peek(self, key: bytes) -> Kept | None:
        """What is kept under `key`, if anything, as it is: no hit or miss counted, its place unchanged."""
        with self._lock:
            return self._entries.get(key)

    def wants(self, key: bytes, size: int, rank: int = -1) -> bool:
        """Whether a snapshot of `size` bytes serving `rank` (Kept.rank) under `key` would be kept:
        none serving as much is kept there yet, and it is at most a quarter of the budget. Asked
        before a snapshot is taken."""
        with self._lock:
            return self._wants(key, size, rank)

    def _wants(self, key: bytes, size: int, rank: int) -> bool:
        old = self._entries.get(key)
        if (old is not None and old.rank >= rank) or size > self.budget // 4:
            return False
        return self.shared is None or not self.shared.serves(key, rank)

    def find(self, keys: list[tuple[int, bytes]], ids: list[int], top_n: int | None = None) -> tuple[int, Kept] | None:
        """The first of `keys` (prompt_keys of `ids`, deepest first) with a snapshot of those very
        ids below its point, carrying the prompt's scores with at least `top_n` top ids when
        `top_n` is given: the point and what is kept (now the most recently used); one hit or one
        miss counted."""
        with self._lock:
            for point, key in keys:
                kept, own = self._entries.get(key), True
                if kept is None or (top_n is not None and kept.rank < top_n):
                    kept, own = None if self.shared is None else self.shared.find(key, top_n), False
                if kept is None or not np.array_equal(kept.snap.host["tokens"], ids[:point]):
                    continue
                if own:
                    self._entries.move_to_end(key)
                    self._used[key] = time.time()
                self.stats.hits += 1
                self.stats.shared_hits += not own
                self.stats.positions += point
                return point, kept
            self.stats.misses += 1
            return None

    def put(self, key: bytes, kept: Kept) -> None:
        """Keep `kept` under `key` (unless `wants` says no; it replaces one serving less), letting the
        least recently used go until it fits the budget (one another lane loaded since this cache
        last used it goes round once more). Shared, it is kept as the file it is published to; a
        borrowed snapshot (views of a live sequence) is written there or copied, here and now."""
        size = kept.nbytes()
        with self._lock:
            if not self._wants(key, size, kept.rank):
                return
            if key not in self._entries:  # room first, so that the files stay within the budget too
                self._make_room(size)  # (one replacing a snapshot of its own key is written first)
        published = None if self.shared is None else self.shared.publish(key, kept)
        if published is None and kept.snap.borrowed:
            kept = Kept(kept.snap.copy(), kept.scores)
        with self._lock:
            stored = self._wants(key, size, kept.rank)  # again: another thread may have kept one
            if stored:
                self._store(key, published or kept, size)
        if self.shared is not None and (published is None) == stored:
            self.shared.remove(key)  # not kept, or a file of ours under `key` serves less than what is

    def _store(self, key: bytes, kept: Kept, size: int) -> None:
        old = self._entries.pop(key, None)
        self.stats.bytes -= 0 if old is None else old.nbytes()
        self._make_room(size)
        self._entries[key], self._used[key] = kept, time.time()
        self.stats.bytes += size
        self.stats.stored += 1
        self.stats.entries = len(self._entries)

    def _make_room(self, size: int) -> None:
        """Let the least recently used snapshots go until `size` more bytes fit the budget."""
        spared: set[bytes] = set()
        while self._entries and self.stats.bytes + size > self.budget:
            oldest = next(iter(self._entries))
            if self.shared is not None and oldest not in spared and self.shared.touched(oldest) > self._used[oldest]:
                spared.add(oldest)
                self._entries.move_to_end(oldest)
                continue
            self._drop(oldest)
            self.stats.evicted += 1

    def _drop(self, key: bytes) -> None:
        kept = self._entries.pop(key)
        del self._used[key]
        self.stats.bytes -= kept.nbytes()
        if self.shared is not None:
            self.shared.remove(key)

    def clear(self) -> None:
        """Let every snapshot go."""
        with self._lock:
            for key in list(self._entries):
                self._drop(key)
            self.stats.entries = 0
