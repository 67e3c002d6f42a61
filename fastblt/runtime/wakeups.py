"""Waking an asyncio event loop from the thread that runs the batch, once per turn.

A streamed request's consumer awaits on an event loop; the batch (a thread lane, or a lane
process's reader thread) hands it text from another thread, and each `call_soon_threadsafe` is a
write to the loop's self-pipe and a wake-up of the loop. Inside `deferred_wakes` (around one turn
of a batch, or one message from a lane process) those calls are held and made once per loop at
the end, so sixteen streams that each got a byte cost one wake-up, not sixteen.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator

_wakes = threading.local()


def wake(loop: asyncio.AbstractEventLoop, callback: Callable[[], object], on_error: Callable[[], object]) -> None:
    """Run `callback` on `loop` (from another thread). Inside `deferred_wakes` the call is held
    and made together with the others for the same loop, so a turn's chunks for many streams wake
    the event loop once, not once per stream. `on_error`: what to do if the loop is closed."""
    held = getattr(_wakes, "held", None)
    if held is not None:
        held.setdefault(loop, []).append((callback, on_error))
        return
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # the loop is closed: nobody listens any more
        on_error()


@contextlib.contextmanager
def deferred_wakes() -> Iterator[None]:
    """Hold the `wake` calls made inside; make them at the end, one event-loop call per loop."""
    outer = getattr(_wakes, "held", None)
    if outer is not None:  # inside another: the outer one makes the calls
        yield
        return
    _wakes.held = held = {}
    try:
        yield
    finally:
        _wakes.held = None
        for loop, calls in held.items():
            try:
                loop.call_soon_threadsafe(_run_all, [callback for callback, _ in calls])
            except RuntimeError:
                for _, on_error in calls:
                    with contextlib.suppress(Exception):
                        on_error()


def _run_all(callbacks: list[Callable[[], object]]) -> None:
    """On the loop: every callback, each failure reported as the loop reports a callback's own."""
    for callback in callbacks:
        try:
            callback()
        except Exception as e:
            asyncio.get_running_loop().call_exception_handler({"message": "fastblt wake-up failed", "exception": e})
