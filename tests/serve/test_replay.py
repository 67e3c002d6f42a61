"""Background streams' event logs: readers from any event on, live or after the end; ended logs
kept within a byte budget, the least recently read dropped first."""

from __future__ import annotations

import asyncio
import threading

from fastblt.serve import replay
from fastblt.serve.replay import Published, Replays


async def _read(log, after: int = -1) -> list[bytes]:
    return [e async for e in log.follow(after)]


def test_readers_follow_a_log_from_any_event_while_it_grows_from_any_thread():
    async def main() -> None:
        replays = Replays(1 << 20)
        log = replays.open("r")
        log.add(b"e0")
        readers = [asyncio.ensure_future(_read(log, after)) for after in (-1, 0, 2, 7)]
        await asyncio.sleep(0)
        adding = threading.Thread(target=lambda: [log.add(f"e{i}".encode()) for i in range(1, 5)])
        adding.start()
        await asyncio.to_thread(adding.join)
        await asyncio.sleep(0.01)
        assert not any(r.done() for r in readers)  # the log has not ended: they wait for more
        replays.close("r")
        every = [f"e{i}".encode() for i in range(5)]
        assert await asyncio.gather(*readers) == [every, every[1:], every[3:], []]
        assert await _read(replays.get("r"), 3) == every[4:]  # ended: read again, from any event

    asyncio.run(main())


def test_ended_logs_are_kept_within_the_budget():
    async def main() -> None:
        replays = Replays(10)
        for rid, size in (("a", 4), ("b", 4), ("huge", 11)):
            replays.open(rid).add(b"x" * size)
            replays.close(rid)
        assert replays.get("huge") is None  # alone past the budget: not kept
        assert replays.get("a") is not None  # read: now the most recently used
        replays.open("c").add(b"x" * 4)
        assert replays.get("c") is not None  # running logs are outside the budget
        replays.close("c")
        assert (replays.get("b"), replays.nbytes) == (None, 8)  # the least recently read dropped
        replays.drop("a")
        assert replays.get("a") is None and replays.nbytes == 4

    asyncio.run(main())


def test_published_logs_are_read_in_order_up_to_the_first_missing_event():
    shared = Published(1 << 20)
    shared.add("r", 2, [b"e2", b"e3"], False)  # a later batch first (a retried call may overtake)
    assert shared.read("r", -1) is None  # a log begins with event 0: this is no log yet
    shared.add("r", 0, [b"e0"], False)
    shared.add("r", 2, [b"e2", b"e3"], True)
    assert shared.read("r", -1) == ([b"e0"], False)  # e1 missing: nothing after it yet
    shared.add("r", 0, [b"e0", b"e1"], False)  # e0 again: counted once
    assert shared.read("r", -1) == ([b"e0", b"e1", b"e2", b"e3"], True)
    assert shared.read("r", 1) == ([b"e2", b"e3"], True) and shared.read("r", 3) == ([], True)
    assert shared.nbytes == 8
    shared.drop("r")
    shared.add("r", 4, [b"late"], True)  # the rest of a dropped log is not kept again
    assert shared.read("r", -1) is None and shared.nbytes == 0


def test_published_ended_logs_are_kept_within_the_budget_and_cancels_are_taken_once():
    shared = Published(10)
    for rid in ("a", "b"):
        shared.add(rid, 0, [b"x" * 4], True)
    shared.add("running", 0, [b"x" * 40], False)  # outside the budget while it runs
    assert shared.read("a", -1) == ([b"x" * 4], True)  # now the most recently read
    shared.add("c", 0, [b"x" * 4], True)
    assert shared.read("b", -1) is None and shared.read("running", -1) is not None
    shared.cancel("a")
    assert shared.cancelled(["a", "b"]) == ["a"] and shared.cancelled(["a"]) == []


def test_a_log_publishes_what_it_gained_within_a_moment_in_one_call_and_its_end_at_once():
    async def main() -> None:
        calls = []
        log = Replays(1 << 20).open("r", lambda first, events, ended: calls.append((first, list(events), ended)))
        log.add(b"e0")
        log.add(b"e1")
        await asyncio.sleep(0)
        adding = threading.Thread(target=log.add, args=(b"e2",))
        adding.start()
        await asyncio.to_thread(adding.join)
        assert calls == []  # not yet: within PUBLISH_S
        await asyncio.sleep(replay.PUBLISH_S * 2)
        log.add(b"e3")
        log.end()
        await asyncio.sleep(0.01)
        log.end()
        await asyncio.sleep(replay.PUBLISH_S * 2)
        assert calls == [(0, [b"e0", b"e1", b"e2"], False), (3, [b"e3"], True)]

    asyncio.run(main())


def test_a_response_is_lost_once_no_replica_renewed_its_lease():
    now = [0.0]
    shared = Published(1 << 20, clock=lambda: now[0])
    shared.add("r", 0, [b"e0"], False)
    old = replay.LEASE_S + 1
    assert not shared.lost("r", old)  # never renewed, but this store is younger than a lease: it may yet be
    now[0] += old
    assert shared.lost("r", old) and not shared.lost("new", 0.0)
    assert shared.read("r", -1) == ([b"e0"], True)  # a lost response's log ends: no more will come
    shared.cancelled(["r"])  # its replica asks for its cancels: alive
    now[0] += replay.LEASE_S - 1
    assert not shared.lost("r", old) and shared.read("r", -1) == ([b"e0"], False)
    now[0] += 2
    assert shared.lost("r", old)
