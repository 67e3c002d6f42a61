"""Background streams' event logs: readers from any event on, live or after the end; ended logs
kept within a byte budget, the least recently read dropped first."""

from __future__ import annotations

import asyncio
import threading

from fastblt.serve.replay import Replays


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
