"""AsyncEngine: awaited and streamed requests equal Generator's, cancellation frees the row."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest
from runtime_refs import PROMPTS, tiny_model

from fastblt.errors import Cancelled, EngineBusy, InputError
from fastblt.formats.checkpoint import save_checkpoint
from fastblt.runtime import courtesy
from fastblt.runtime.async_engine import AsyncEngine


@pytest.fixture(scope="module")
def engine():
    eng = AsyncEngine(tiny_model("small-window"), backend="torch", max_batch=4, max_queue=2)
    yield eng
    eng.close(30)


def test_concurrent_awaits_equal_serial_generation(engine):
    g = engine.generator
    work = [(p, m) for p in PROMPTS[:3] for m in ("ar", "blt-s", "blt-d", "blt-dv")]

    async def main():
        return await asyncio.gather(*[engine.generate(p, mode=m, max_bytes=20, stop_on_eos=False) for p, m in work])

    engine.batch.max_queue = 64
    snapshot = engine.stats
    try:
        outs = asyncio.run(main())
    finally:
        engine.batch.max_queue = 2
    assert [o.ids for o in outs] == [g.generate(p, mode=m, max_bytes=20, stop_on_eos=False).ids for p, m in work]
    assert engine.stats.admitted == snapshot.admitted + len(work)  # `stats` is a snapshot, not the live counters


def test_stream_yields_the_generation_text(engine):
    async def main():
        stream = engine.stream(PROMPTS[3], mode="blt-s", max_bytes=30, temperature=0.7, seed=5)
        chunks = [c async for c in stream]
        return chunks, stream.generation

    chunks, gen = asyncio.run(main())
    want = engine.generator.generate(PROMPTS[3], mode="blt-s", max_bytes=30, temperature=0.7, seed=5)
    assert "".join(chunks) == gen.text == want.text and gen.ids == want.ids


def test_cancelling_the_task_cancels_the_request(engine):
    async def main():
        task = asyncio.create_task(engine.generate(PROMPTS[0], mode="ar", max_bytes=50_000, stop_on_eos=False))
        while engine.stats.active == 0 and not task.done():
            await asyncio.sleep(0.005)
        assert not task.done(), task.exception()  # a request that failed at once must not hang the test
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(1000):  # the row is freed before the batch's next step
            if engine.stats.active == 0:
                return True
            await asyncio.sleep(0.005)
        return False

    before = engine.stats.cancelled
    assert asyncio.run(main())
    assert engine.stats.cancelled == before + 1


def test_bad_requests_raise_before_queueing_and_a_full_queue_is_busy(engine):
    async def main():
        with pytest.raises(InputError, match="option temperature"):
            await engine.generate("x", mode="ar", temperature=-1)
        streams = [engine.stream(PROMPTS[0], mode="ar", max_bytes=20_000, stop_on_eos=False) for _ in range(6)]
        with pytest.raises(EngineBusy):
            engine.stream(PROMPTS[0], mode="ar", max_bytes=5)
        assert (engine.held, engine.waiting) == (6, 2)  # four rows decode, two requests wait for one
        for s in streams:
            await s.aclose()

    asyncio.run(main())


def test_the_event_loop_is_marked_busy_while_its_requests_are_in_flight(engine):
    """Compiles on other threads hand the GIL to an event loop streaming requests (courtesy.py):
    its thread is marked from submit to the request's end, however it ends (done, cancelled,
    refused as busy), and no mark outlives the requests."""
    me = threading.get_ident()

    async def main():
        stream = engine.stream(PROMPTS[0], mode="ar", max_bytes=30, stop_on_eos=False)
        await stream.__anext__()
        marked = courtesy._busy.get(me, 0)
        async for _ in stream:
            pass
        long = []
        with pytest.raises(EngineBusy):  # every row and queue place taken, then one refused
            for _ in range(20):
                long.append(engine.stream(PROMPTS[1], mode="ar", max_bytes=20_000, stop_on_eos=False))
        assert courtesy._busy.get(me, 0) == len(long) > 1
        for s in long:
            await s.aclose()
        for _ in range(1000):  # cancelled: their rows are freed before the batch's next step
            if engine.stats.active == engine.stats.queued == 0:
                break
            await asyncio.sleep(0.005)
        await engine.generate(PROMPTS[2], mode="blt-s", max_bytes=10)
        return marked

    assert asyncio.run(main()) == 1
    assert me not in courtesy._busy


def test_two_lanes_split_the_rows_and_equal_serial_generation():
    eng = AsyncEngine(tiny_model("small-window"), backend="torch", max_batch=5, max_queue=3, lanes=2)
    try:
        assert [lane.max_batch for lane in eng.lanes] == [3, 2] and eng.max_batch == 5
        assert [lane.max_queue for lane in eng.lanes] == [2, 1]
        assert eng.lanes[0].engine is not eng.lanes[1].engine  # a backend of its own per lane
        g = eng.generator
        work = [(p, m) for p in PROMPTS[:2] for m in ("ar", "blt-s", "blt-d", "blt-dv")]

        async def main():
            return await asyncio.gather(*[eng.generate(p, mode=m, max_bytes=16, stop_on_eos=False) for p, m in work])

        outs = asyncio.run(main())
        assert [o.ids for o in outs] == [g.generate(p, mode=m, max_bytes=16, stop_on_eos=False).ids for p, m in work]
        admitted = [lane.stats.admitted for lane in eng.lanes]
        assert min(admitted) > 0 and eng.stats.admitted == sum(admitted) == len(work)
        assert eng.stats.calls["decoder"] == sum(lane.stats.calls["decoder"] for lane in eng.lanes)
    finally:
        eng.close(30)


def test_a_full_lane_passes_requests_to_one_with_room():
    eng = AsyncEngine(tiny_model("small-window"), backend="torch", max_batch=3, max_queue=1, lanes=2)
    try:
        assert [(lane.max_batch, lane.max_queue) for lane in eng.lanes] == [(2, 1), (1, 0)]

        async def main():
            # three decoding (two in lane 0); the fourth goes to the least loaded lane, lane 1, which
            # has no queue, so it waits in lane 0's; a fifth finds no room anywhere
            streams = [eng.stream(PROMPTS[0], mode="ar", max_bytes=20_000, stop_on_eos=False) for _ in range(4)]
            held = []
            for lane in eng.lanes:
                with lane._cv:  # admission moves a request from the queue to a row under this lock
                    held.append(len(lane.queue) + sum(s is not None for s in lane.live))
            with pytest.raises(EngineBusy, match="max_queue 1"):
                eng.stream(PROMPTS[0], mode="ar", max_bytes=5)
            for s in streams:
                await s.aclose()
            return held

        assert asyncio.run(main()) == [3, 1]
    finally:
        eng.close(30)


def test_lane_arguments_are_checked_and_defaults_follow_the_backend(monkeypatch):
    from fastblt.runtime import async_engine as ae

    model = tiny_model("small-window")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="lanes: expected an int >= 1"):
            AsyncEngine(model, backend="torch", lanes=bad)
    with pytest.raises(InputError, match="max_batch: expected an int >= 1"):
        AsyncEngine(model, backend="torch", max_batch=0)
    one = AsyncEngine(model, backend="torch", max_batch=1, lanes=2)  # a lane holds at least one row
    try:
        assert len(one.lanes) == 1
        with pytest.raises(InputError, match="give the backend by name"):
            AsyncEngine(model, backend=one.generator.engine, lanes=2)
    finally:
        one.close(30)
    assert [sum(ae.share(n, k, i) for i in range(k)) for n, k in ((16, 2), (5, 2), (7, 3))] == [16, 5, 7]


def test_the_lane_plan_follows_cores_rows_and_memory(monkeypatch):
    """A worker lane per core (at most a row each), two at most as threads, one for torch; each
    ort lane's global step on its share of the cores; no more workers than half the memory holds."""
    from fastblt.runtime import async_engine as ae

    monkeypatch.setattr(ae, "cpu_cores", lambda: 2)
    assert (ae.default_lanes("ort"), ae.default_lanes("torch")) == (2, 1)
    lanes = ae.default_lanes
    assert [lanes("ort", cores) for cores in (1, 2, 3, 16, 64)] == [1, 2, 3, 16, 16]  # 16 rows by default
    assert (lanes("ort", 16, max_batch=4), lanes("ort", 16, max_batch=64)) == (4, 16)
    assert lanes("ort", 256, max_batch=1024) == ae.MAX_LANES  # a process each: bounded
    assert (lanes("ort", 16, processes=False), lanes("ort", 1, processes=False)) == (2, 1)
    assert [ae.global_threads(cores, n) for cores, n in ((2, 2), (3, 2), (16, 2), (16, 16), (4, 1))] == [1, 1, 8, 1, 4]
    mb = 1 << 20
    assert [ae.memory_lanes(300 * mb, avail * mb) for avail in (100, 600, 1200, 10_000)] == [1, 1, 2, 16]
    monkeypatch.setattr(ae, "memory_available", lambda: None)
    assert ae.memory_lanes(300 * mb) > 1000  # unknown: no limit from memory


def test_a_lane_that_cannot_start_leaves_no_batch_loop_running(monkeypatch):
    import threading

    from fastblt.runtime import async_engine as ae

    def loops() -> int:
        return sum(t.name == "fastblt-batch" and t.is_alive() for t in threading.enumerate())

    before = loops()
    made = []

    class FailingSecond(ae.BatchEngine):
        def __init__(self, *args, **kwargs):
            if made:
                raise InputError("max_batch 2: the second lane refuses it")
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(ae, "BatchEngine", FailingSecond)
    with pytest.raises(InputError, match="second lane"):
        AsyncEngine(tiny_model("small-window"), backend="torch", max_batch=4, lanes=2)
    assert len(made) == 1
    made[0]._thread.join(10)
    assert loops() == before


def test_closing_stops_every_lane_taking_requests():
    from fastblt.errors import EngineClosed

    eng = AsyncEngine(tiny_model("small-window"), backend="torch", max_batch=4, lanes=2)
    eng.close(30)
    assert all(lane._closing and not lane._thread.is_alive() for lane in eng.lanes)
    with pytest.raises(EngineClosed):
        asyncio.run(eng.generate(PROMPTS[0], mode="ar", max_bytes=4))


def _active_reaches(engine, want: int, seconds: float = 20.0) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while engine.stats.active != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.stats.active == want


def test_a_stream_its_consumer_lets_go_of_frees_its_row(engine):
    """Leaving `async for` by break or by an exception drops the stream: that cancels its request
    (the batch reaches a stream only weakly); `async with` closes it too."""

    async def leave(how: str) -> None:
        if how == "with":
            async with engine.stream(PROMPTS[0], mode="ar", max_bytes=50_000, stop_on_eos=False) as stream:
                async for _ in stream:
                    return
        async for _ in engine.stream(PROMPTS[1], mode="ar", max_bytes=50_000, stop_on_eos=False):
            if how == "break":
                break
            raise KeyError("the consumer failed")

    before = engine.stats.cancelled
    for how in ("break", "raise", "with"):
        with contextlib.suppress(KeyError):
            asyncio.run(leave(how))
        assert _active_reaches(engine, 0), how
    assert engine.stats.cancelled == before + 3


def test_a_stream_whose_event_loop_closed_frees_its_row(engine):
    """A stream still referenced when its event loop closes cannot be read again: the next text
    the batch has for it cancels its request."""
    kept = []

    async def start() -> None:
        stream = engine.stream(PROMPTS[2], mode="ar", max_bytes=50_000, stop_on_eos=False)
        kept.append(stream)
        await stream.__anext__()  # decoding now
        await asyncio.sleep(0.2)  # more text arrives, unread: the loop closes with a wake-up spent on it

    before = engine.stats.cancelled
    asyncio.run(start())
    assert _active_reaches(engine, 0)
    assert kept[0].ticket.cancelled and engine.stats.cancelled == before + 1


def test_a_stream_still_referenced_is_cancelled_by_its_task_or_aclose(engine):
    """A stream its consumer still holds (so dropping it cancels nothing) is cancelled when the
    task iterating it is cancelled, or when it is closed with `aclose`: otherwise its request
    decodes on, holding a row, until max_bytes."""

    async def main(how: str) -> bool:
        stream = engine.stream(PROMPTS[0], mode="ar", max_bytes=50_000, stop_on_eos=False)
        try:
            await stream.__anext__()  # decoding now
            if how == "task":

                async def consume() -> None:
                    async for _ in stream:  # suspends only while it waits for text
                        pass

                task = asyncio.create_task(consume())
                await asyncio.sleep(0.05)
                assert not task.done(), task.exception()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            else:
                await stream.aclose()
            return stream.ticket.cancelled  # while the loop runs (a closed loop cancels it anyway)
        finally:
            stream.cancel()

    before = engine.stats.cancelled
    for how in ("task", "aclose"):
        assert asyncio.run(main(how)), how
        assert _active_reaches(engine, 0), how
    assert engine.stats.cancelled == before + 2


@pytest.mark.parametrize("processes", [False, True])
def test_closing_with_a_timeout_cancels_what_every_lane_still_holds(processes, tmp_path):
    if processes:  # worker lanes load a checkpoint by path
        path = save_checkpoint(tiny_model("small-window"), tmp_path / "ckpt")
        eng = AsyncEngine(str(path), backend="ort", max_batch=4, lanes=2, processes=True, cache_dir=tmp_path / "c")
    else:
        eng = AsyncEngine(tiny_model("small-window"), backend="torch", max_batch=4, lanes=2)

    async def start() -> list:
        streams = [eng.stream(p, mode="ar", max_bytes=50_000, stop_on_eos=False) for p in PROMPTS[:3]]
        while eng.stats.active < 3:
            await asyncio.sleep(0.01)
        return streams

    streams = asyncio.run(start())
    eng.close(timeout=0.5)
    if processes:
        assert all(lane._proc.poll() is not None for lane in eng.lanes)  # every worker, not only the first
    else:
        assert all(not lane._thread.is_alive() for lane in eng.lanes)
    assert all(s.ticket.done and isinstance(s.ticket.error, Cancelled) for s in streams)


def test_loading_arguments_are_checked_before_anything_loads(tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    for kw, message in [(dict(threads="2"), "threads: expected an int"), (dict(threads=0), "threads"),
                        (dict(threads=10**6), "threads"), (dict(cache_dir=afile), "is not a directory"),
                        (dict(on_export=5), "on_export: expected a callable"), (dict(processes="yes"), "processes"),
                        (dict(bogus=1), "bogus: unknown")]:  # fmt: skip
        with pytest.raises(InputError, match=message):
            AsyncEngine(tiny_model("small-window"), backend="torch", max_batch=2, **kw)


def test_an_engine_dropped_without_close_ends_its_worker_processes(tmp_path):
    import gc
    import time

    path = save_checkpoint(tiny_model("small-window"), tmp_path / "ckpt")
    eng = AsyncEngine(str(path), backend="ort", max_batch=2, lanes=2, processes=True, cache_dir=tmp_path / "c")
    lanes = list(eng.lanes)
    del eng
    gc.collect()
    deadline = time.monotonic() + 30
    while any(lane._proc.poll() is None for lane in lanes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(lane._proc.poll() is not None for lane in lanes)


def test_a_cancelled_stream_ends_with_cancelled_whenever_it_is_read(engine):
    """Reading a cancelled stream raises Cancelled, whether the batch has reported its end yet or
    not (it ended quietly before the report, so a consumer could take a cut text for a whole one)."""

    async def main(wait: float) -> None:
        stream = engine.stream(PROMPTS[0], mode="ar", max_bytes=50_000, stop_on_eos=False)
        await stream.__anext__()
        stream.cancel()
        await asyncio.sleep(wait)  # 0: before the batch reports the end; 0.5: after
        with pytest.raises(Cancelled):
            async for _ in stream:
                pass
        assert stream.generation is None

    for wait in (0.0, 0.5):
        asyncio.run(main(wait))
    assert _active_reaches(engine, 0)


def test_closing_with_time_to_spare_finishes_what_is_in_flight():
    """close(timeout) waits for the requests in flight while the time lasts: with time to spare
    they finish whole (they are cancelled only when it runs out). `capacity` is every lane's rows
    and queue places: what the server may take at once."""
    eng = AsyncEngine(tiny_model(), backend="torch", max_batch=4, max_queue=6, lanes=2, processes=False)
    assert eng.capacity == 4 + 6 == sum(lane.max_batch + lane.max_queue for lane in eng.lanes)
    tickets = [eng._submit(eng.request(p, mode="ar", max_bytes=200, stop_on_eos=False)) for p in PROMPTS[:3]]
    eng.close(timeout=60)
    assert [len(t.result(0).ids) for t in tickets] == [200, 200, 200]


def test_a_prompt_goes_back_to_the_lane_that_keeps_its_snapshot():
    """Of lanes holding as few requests, the one that last took a prompt takes it again (its
    snapshot is there): a prompt first sent while lane 0 was busy loads it on lane 1 when both are
    idle; outputs equal a Generator's. (Lanes that do not share snapshots: where they do, any lane
    would load it.)"""
    eng = AsyncEngine(tiny_model("small-window"), backend="torch", max_batch=2, lanes=2, share_prompts=False)
    prompt = (PROMPTS[5] * 3).encode()
    want = eng.generator.generate(prompt, mode="ar", max_bytes=8, stop_on_eos=False).ids

    async def main():
        busy = asyncio.ensure_future(eng.generate(PROMPTS[0], mode="ar", max_bytes=300, stop_on_eos=False))
        await asyncio.sleep(0)  # submitted: lane 0 holds it
        first = await eng.generate(prompt, mode="ar", max_bytes=8, stop_on_eos=False)
        await busy
        return first, await eng.generate(prompt, mode="ar", max_bytes=8, stop_on_eos=False)

    try:
        first, again = asyncio.run(main())
        hits = [lane.stats.prompt_hits for lane in eng.lanes]
    finally:
        eng.close(30)
    assert first.ids == again.ids == want
    assert (first.stats.prompt_cached, again.stats.prompt_cached > 0) == (0, True)
    assert hits == [0, 1]


def test_a_request_goes_to_the_lane_where_it_waits_behind_the_fewest_of_its_priority():
    """One row per lane: lane 0 runs a request of priority 0, lane 1 one of priority 2 (as loaded).
    A new request of priority 0 goes to lane 1 and preempts there (in lane 0 it would wait for the
    other's end); the preempted one then resumes; both are what Generator computes."""
    eng = AsyncEngine(tiny_model("small-window"), backend="torch", max_batch=2, lanes=2)
    g = eng.generator

    async def main():
        endless = asyncio.create_task(eng.generate(PROMPTS[0], mode="ar", max_bytes=50_000, stop_on_eos=False))
        while eng.stats.active < 1:
            await asyncio.sleep(0.001)
        low = asyncio.create_task(eng.generate(PROMPTS[1], mode="ar", max_bytes=200, stop_on_eos=False,
                                               priority=2))  # fmt: skip
        while eng.stats.active < 2:
            await asyncio.sleep(0.001)
        high = await eng.generate(PROMPTS[3], mode="ar", max_bytes=8, stop_on_eos=False)
        lanes = [lane.stats.preempted for lane in eng.lanes]
        low_done = await low
        endless.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await endless
        return high, lanes, low_done

    try:
        high, lanes, low = asyncio.run(main())
    finally:
        eng.close(30)
    assert lanes == [0, 1]
    assert high.ids == g.generate(PROMPTS[3], mode="ar", max_bytes=8, stop_on_eos=False).ids
    assert low.ids == g.generate(PROMPTS[1], mode="ar", max_bytes=200, stop_on_eos=False).ids
