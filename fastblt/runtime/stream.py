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

from fastblt.model.config import BYTE_OFFSET, EOS_ID


class Output:
    """The verified output of one call. `push` returns True once generation must stop."""

    def __init__(self, max_bytes: int, stop: tuple[bytes, ...] = (), stop_on_eos: bool = True):
        self.max_bytes, self.stop, self.stop_on_eos = max_bytes, stop, stop_on_eos
        self.ids: list[int] = []  # every generated id (EOS excluded), stop-string bytes included
        self.data = bytearray()  # output bytes (stop string removed)
        self.times: list[float] = []  # perf_counter() when each id was verified
        self.done = False
        self.stop_reason: str | None = None  # "eos" | "stop" | "max_bytes"

    @property
    def remaining(self) -> int:
        return self.max_bytes - len(self.ids)

    def push(self, ids) -> bool:
        """Append verified ids (an iterable of ints) until a stop condition; True when done."""
        now = time.perf_counter()
        for t in ids:
            t = int(t)
            if t == EOS_ID and self.stop_on_eos:
                return self._finish("eos")
            self.ids.append(t)
            self.times.append(now)
            if t >= BYTE_OFFSET:
                self.data.append(t - BYTE_OFFSET)
                if self.stop and self._cut_stop():
                    return self._finish("stop")
            if len(self.ids) >= self.max_bytes:
                return self._finish("max_bytes")
        return self.done

    def _cut_stop(self) -> bool:
        for s in self.stop:
            if self.data.endswith(s):
                del self.data[len(self.data) - len(s) :]
                return True
        return False

    def _finish(self, reason: str) -> bool:
        self.done, self.stop_reason = True, reason
        return True


class TextChunker:
    """Incremental UTF-8 decoding of `Output.data` that holds back a possible stop-string prefix."""

    def __init__(self, stop: tuple[bytes, ...] = ()):
        self.stop = stop
        self.sent = 0  # bytes of data already fed to the decoder
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
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(data)), best, -1):
                if data.endswith(s[:n]):
                    best = n
                    break
        return best
