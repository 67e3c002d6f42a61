"""Long pure-Python work hands the interpreter lock to a process's decoding loops promptly.

Compiling a schema's automata (a number's bounds beside a multipleOf, a pattern held to long
lengths, a pattern beside a format) can take a few hundred milliseconds of Python. A thread doing
that keeps the GIL until another thread has waited `sys.getswitchinterval()` (5 ms) for it; a
decoding loop gives the GIL up at every backend call (three or four a byte) and then waits that
long each time to get it back: `ar` on the embedded default made ~30 bytes/s beside such a
compile against ~2,000 alone, so every stream of a lane stalled behind one request's schema, and
a server's event loop answered in tens of milliseconds instead of microseconds.

Latency-bound work marks the thread it runs on (`serving`, `busy`/`idle`): a batch loop's turns, a
Generator's call, the event loop of an AsyncEngine with requests in flight. The compiling loops
call `pause()`, which, while another thread is so marked, sleeps for an instant every GAP_S of
work, and a loop waiting for the GIL takes it then. The compile runs while the loops are in their
backend calls and takes longer while streams decode: its own request's wait, not theirs
(benchmarks/json_mode.py measures both). With nothing marked it runs at full speed.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

GAP_S = 20e-6  # seconds of work between hand-overs while a loop runs (each costs ~50 us: the sleep's timer slack)
_busy: dict[int, int] = {}  # thread id -> latency-bound sections open on it
_lock = threading.Lock()
_last = 0.0  # when the last hand-over was (any thread's: a race only moves the next one)


def busy(thread: int | None = None) -> None:
    """Mark `thread` (the caller's by default) as running latency-bound work, until `idle`."""
    key = threading.get_ident() if thread is None else thread
    with _lock:
        _busy[key] = _busy.get(key, 0) + 1


def idle(thread: int | None = None) -> None:
    """End one `busy` of `thread` (the caller's by default)."""
    key = threading.get_ident() if thread is None else thread
    with _lock:
        n = _busy.get(key, 0) - 1
        if n > 0:
            _busy[key] = n
        else:
            _busy.pop(key, None)


@contextlib.contextmanager
def serving() -> Iterator[None]:
    """The calling thread is marked busy for the block."""
    busy()
    try:
        yield
    finally:
        idle()


def others_busy() -> bool:
    """Whether a thread other than the caller runs latency-bound work now."""
    return bool(_busy) and (len(_busy) > 1 or threading.get_ident() not in _busy)


def pause() -> None:
    """Called in the inner loops of long work: let a busy thread take the GIL, at most every GAP_S."""
    global _last
    if not _busy or not others_busy():
        return
    now = time.perf_counter()
    if now - _last >= GAP_S:
        time.sleep(0)  # releases the GIL; a thread waiting for it is woken and takes it
        _last = time.perf_counter()
