"""Waking event loops from a batch thread: one call per loop per turn, errors reported, closed loops."""

from __future__ import annotations

import asyncio
import threading

from fastblt.runtime.wakeups import deferred_wakes, wake


class CountingLoop:
    """Stands in for an event loop: counts thread-safe calls and runs them at once."""

    def __init__(self, closed: bool = False):
        self.calls, self.closed = 0, closed

    def call_soon_threadsafe(self, callback, *args):
        if self.closed:
            raise RuntimeError("Event loop is closed")
        self.calls += 1
        callback(*args)


def test_wakes_inside_a_turn_are_one_call_per_loop():
    a, b, ran = CountingLoop(), CountingLoop(), []
    with deferred_wakes():
        for i in range(16):
            wake(a, lambda i=i: ran.append(("a", i)), lambda: None)
        with deferred_wakes():  # nested: the outer one makes the calls
            wake(b, lambda: ran.append(("b", 0)), lambda: None)
        assert ran == [] and a.calls == b.calls == 0
    assert (a.calls, b.calls) == (1, 1)
    assert ran == [("a", i) for i in range(16)] + [("b", 0)]
    wake(a, lambda: ran.append(("a", 16)), lambda: None)  # outside a turn: at once
    assert a.calls == 2 and ran[-1] == ("a", 16)


def test_a_closed_loop_calls_each_on_error():
    errors = []
    with deferred_wakes():
        for i in range(3):
            wake(CountingLoop(closed=True), lambda: None, lambda i=i: errors.append(i))
    wake(CountingLoop(closed=True), lambda: None, lambda: errors.append("now"))
    assert errors == [0, 1, 2, "now"]


def test_a_failing_callback_does_not_stop_the_others_and_is_reported():
    reported, ran = [], []

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: reported.append(context["exception"]))
        done = asyncio.Event()

        def batch_thread():
            with deferred_wakes():
                wake(loop, lambda: 1 / 0, lambda: None)
                wake(loop, lambda: ran.append(1), lambda: None)
                wake(loop, done.set, lambda: None)

        threading.Thread(target=batch_thread).start()
        await asyncio.wait_for(done.wait(), 10)

    asyncio.run(main())
    assert ran == [1] and len(reported) == 1 and isinstance(reported[0], ZeroDivisionError)
