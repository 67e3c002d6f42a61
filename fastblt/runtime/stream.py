"""Where verified bytes go: stop conditions (EOS, stop strings, max bytes) and UTF-8-safe chunks.

`Output` receives every verified id from a decoding loop, in order, and decides when to stop:
- EOS (id 2) ends the output before it (when stop_on_eos);
- a stop string ends the output before it (the stop string is not part of `.data`);
- `max_bytes` ids generated ends it after the last one.
Special ids other than EOS (BOE, BOS, 3) count as generated ids but add no output byte.

`TextChunker` turns the growing byte output into text chunks that never split a UTF-8 sequence
and never show bytes that might still turn out to be the start of a stop string.
"""

from __future__ import annotations

import codecs
import time

import numpy as np

from fastblt.model.config import BYTE_OFFSET, EOS_ID
from fastblt.runtime.sampling import log_probs

Scores = tuple[list[int], list[float], list[dict[int, float]]]  # ids, their logprobs, their top logprobs


class Output:
    """The verified output of one call. `push` returns True once generation must stop.

    With `top_logprobs` set (0 or more), every id also gets its log-probability under the logits
    it was drawn after (`logprobs`), and the `top_logprobs` most likely ids with theirs; with
    `prompt_top_logprobs`, every prompt id after BOS likewise (`score_prompt`, from the prefill)."""

    def __init__(self, max_bytes: int, stop: tuple[bytes, ...] = (), stop_on_eos: bool = True,
                 top_logprobs: int | None = None, prompt_top_logprobs: int | None = None):  # fmt: skip
        self.max_bytes, self.stop, self.stop_on_eos = max_bytes, stop, stop_on_eos
        self.ids: list[int] = []  # every generated id (EOS excluded), stop-string bytes included
        self.data = bytearray()  # output bytes (stop string removed)
        self.times: list[float] = []  # perf_counter() when each id was verified
        self.done = False
        self.stop_reason: str | None = None  # "eos" | "stop" | "max_bytes"
        self.top_n, self.prompt_top_n = top_logprobs, prompt_top_logprobs
        self.logprobs: list[float] | None = None if top_logprobs is None else []  # one per id
        self.top_logprobs: list[dict[int, float]] | None = None if top_logprobs is None else []
        self.prompt_logprobs: list[float] | None = None if prompt_top_logprobs is None else []
        self.prompt_top_logprobs: list[dict[int, float]] | None = None if prompt_top_logprobs is None else []
        self._scored = self._scored_bytes = 0  # ids (and the bytes among them) `new_scores` handed out

    @property
    def remaining(self) -> int:
        return self.max_bytes - len(self.ids)

    def push(self, ids, logits: np.ndarray | None = None) -> bool:
        """Append verified ids (an iterable of ints) until a stop condition; True when done.
        `logits` (len(ids), V): row i is what ids[i] was drawn after (read only for logprobs)."""
        now = time.perf_counter()
        for i, t in enumerate(ids):
            t = int(t)
            if t == EOS_ID and self.stop_on_eos:
                return self._finish("eos")
            self.ids.append(t)
            self.times.append(now)
            if self.logprobs is not None:
                _score([t], logits[i : i + 1], self.top_n, self.logprobs, self.top_logprobs)
            if t >= BYTE_OFFSET:
                self.data.append(t - BYTE_OFFSET)
                if self.stop and self._cut_stop():
                    return self._finish("stop")
            if len(self.ids) >= self.max_bytes:
                return self._finish("max_bytes")
        return self.done

    def score_prompt(self, ids: list[int], rows: np.ndarray) -> None:
        """The next prompt ids, each scored under its row of logits (the position before it; rows
        past the last id are not read): a prefill chunk's rows at once (~13 us a row, ~28 alone)."""
        _score(ids, rows, self.prompt_top_n, self.prompt_logprobs, self.prompt_top_logprobs)

    def new_scores(self, upto: int) -> Scores:
        """The scores of the ids up to data byte `upto` (exclusive) not handed out before: a
        streamed chunk's (ids, logprobs, top_logprobs), special ids between its bytes included."""
        start = end = self._scored
        while self._scored_bytes < upto:  # through the id of data byte upto - 1 (a byte id each)
            self._scored_bytes += self.ids[end] >= BYTE_OFFSET
            end += 1
        self._scored = end
        return self.ids[start:end], self.logprobs[start:end], self.top_logprobs[start:end]

    def _cut_stop(self) -> bool:
        for s in self.stop:
            if self.data.endswith(s):
                del self.data[len(self.data) - len(s) :]
                return True
        return False

    def _finish(self, reason: str) -> bool:
        self.done, self.stop_reason = True, reason
        return True


def _score(ids: list[int], rows: np.ndarray, top_n: int, logprobs: list[float], tops: list[dict[int, float]]) -> None:
    """Each of `ids` scored under its row of logits (rows past the last id are not read): its
    log-probability onto `logprobs`, its row's `top_n` most likely ids with theirs onto `tops`."""
    lp = log_probs(np.asarray(rows)[: len(ids)])  # (S, V)
    top = np.argsort(-lp, axis=-1, kind="stable")[:, :top_n]  # ties: the lower id first
    for row, t, best in zip(lp, ids, top, strict=True):
        logprobs.append(float(row[t]))
        tops.append(dict(zip(best.tolist(), row[best].tolist(), strict=True)))


class TextChunker:
    """Incremental UTF-8 decoding of `Output.data` that holds back a possible stop-string prefix."""

    def __init__(self, stop: tuple[bytes, ...] = ()):
        self.stops = [StopPrefix(s) for s in stop if s]
        self.sent = 0  # bytes of data already fed to the decoder
        self.seen = 0  # bytes of data already fed to the stop prefixes
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def take(self, data: bytearray, final: bool = False) -> str:
        """The text that is safe to show now ("" when none); `final` flushes everything."""
        end = len(data) if final else len(data) - self._held(data)
        if end <= self.sent and not final:
            return ""
        chunk = bytes(data[self.sent : end])
        self.sent = max(self.sent, end)
        return self.decoder.decode(chunk, final=final)

    def _held(self, data: bytearray) -> int:
        """Length of the longest suffix of data that is a proper prefix of a stop string."""
        if not self.stops:
            return 0
        if len(data) < self.seen:  # cut by a stop string (Output is done): start over on what is left
            for p in self.stops:
                p.matched = 0
            self.seen = 0
        new, self.seen = bytes(data[self.seen :]), len(data)
        return max(p.feed(new) for p in self.stops)


class StopPrefix:
    """How much of one stop string the output ends with, updated byte by byte (Knuth-Morris-Pratt):
    a chunk costs what its new bytes cost, where testing every prefix of the stop string against
    the output's end would cost its length squared on every chunk (a client may send long ones)."""

    def __init__(self, stop: bytes):
        self.stop, self.matched = stop, 0
        self.fall = [0] * len(stop)  # fall[i]: longest proper prefix of stop[: i + 1] that ends it
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fall[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fall[i] = k

    def feed(self, new: bytes) -> int:
        """Take the output's next bytes; returns the longest proper prefix of the stop string the
        output now ends with."""
        stop, fall, n = self.stop, self.fall, self.matched
        for b in new:
            while n and (n == len(stop) or stop[n] != b):
                n = fall[n - 1]
            if stop[n] == b:
                n += 1
        self.matched = n
        return n if n < len(stop) else fall[n - 1]
