"""Lanes in worker processes: the same bytes as Generator, cancellation, a full queue, a lane
process that dies, closing, and no worker outliving its parent."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from runtime_refs import PROMPTS, tiny_model

from fastblt.errors import EngineBusy, EngineClosed, InputError, LaneLost
from fastblt.runtime import async_engine as ae
from fastblt.runtime.async_engine import AsyncEngine
from fastblt.runtime.lane_process import CANCEL_GRACE, ProcessLane


def gone(pid: int, within: float) -> bool:
    """Whether process `pid` has ended within `within` seconds (a zombie has: an init that does
    not reap orphans at once leaves them)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        try:  # our own child: reap it, or it stays a zombie that os.kill still finds
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def engine():
    eng = AsyncEngine("default", backend="ort", max_batch=4, max_queue=16, lanes=2, processes=True)
    yield eng
    eng.close(30)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def name_of(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_lanes_run_in_processes_of_their_own(engine):
    assert engine.processes and all(isinstance(lane, ProcessLane) for lane in engine.lanes)
    pids = {lane.pid for lane in engine.lanes}
    assert len(pids) == 2 and os.getpid() not in pids
    zygote = engine._zygote.pid  # forked from one process that imported the runtime for all
    assert {parent_of(pid) for pid in pids} == {zygote} and parent_of(zygote) == os.getpid()
    assert {name_of(pid) for pid in pids} == {"fastblt-lane"} and name_of(zygote) == "fastblt-zygote"
    assert [lane.max_batch for lane in engine.lanes] == [2, 2] and engine.max_batch == 4


def test_requests_equal_generator_in_every_mode(engine):
    g = engine.generator
    work = [(p, m) for p in PROMPTS[:3] for m in ("ar", "blt-s", "blt-d", "blt-dv")]
    sampled = dict(temperature=0.8, seed=11)

    async def main():
        greedy = [engine.generate(p, mode=m, max_bytes=24, stop_on_eos=False) for p, m in work]
        return await asyncio.gather(*greedy, engine.generate(PROMPTS[3], mode="blt-s", max_bytes=24, **sampled))

    outs = asyncio.run(main())
    want = [g.generate(p, mode=m, max_bytes=24, stop_on_eos=False).ids for p, m in work]
    assert [o.ids for o in outs[:-1]] == want
    assert outs[-1].ids == g.generate(PROMPTS[3], mode="blt-s", max_bytes=24, **sampled).ids
    assert sum(lane.stats.admitted for lane in engine.lanes) >= len(work) + 1
    assert all(lane.stats.admitted > 0 for lane in engine.lanes)  # both lanes took requests


def test_stream_and_stop_string_cross_the_pipe(engine):
    async def main():
        stream = engine.stream(PROMPTS[0], mode="ar", max_bytes=40, stop=["\n"], stop_on_eos=False)
        chunks = [c async for c in stream]
        return chunks, stream.generation

    chunks, gen = asyncio.run(main())
    want = engine.generator.generate(PROMPTS[0], mode="ar", max_bytes=40, stop=["\n"], stop_on_eos=False)
    assert "".join(chunks) == gen.text == want.text and gen.stop_reason == want.stop_reason
    assert gen.stats.mode == "ar" and gen.stats.generated == len(want.ids)


def test_each_lane_is_told_whether_the_others_hold_requests(engine):
    """A lane alone runs its global step on every core; the parent tells it when that changes."""

    async def main():
        long = [asyncio.create_task(engine.generate(PROMPTS[0], mode="ar", max_bytes=50_000, stop_on_eos=False))]
        await asyncio.sleep(0)
        alone = [lane._peers_busy for lane in engine.lanes]
        long.append(asyncio.create_task(engine.generate(PROMPTS[1], mode="ar", max_bytes=50_000, stop_on_eos=False)))
        await asyncio.sleep(0)
        both = [lane._peers_busy for lane in engine.lanes]
        for t in long:
            t.cancel()
        await asyncio.gather(*long, return_exceptions=True)
        for _ in range(500):
            if not any(lane._peers_busy for lane in engine.lanes):
                break
            await asyncio.sleep(0.01)
        return alone, both, [lane._peers_busy for lane in engine.lanes]

    alone, both, after = asyncio.run(main())
    assert sorted(alone) == [False, True]  # the lane holding the request is told it is alone
    assert both == [True, True] and after == [False, False]


def test_cancelling_frees_the_row_in_the_child(engine):
    async def main():
        task = asyncio.create_task(engine.generate(PROMPTS[0], mode="ar", max_bytes=50_000, stop_on_eos=False))
        while engine.stats.active == 0 and not task.done():
            await asyncio.sleep(0.01)
        assert not task.done(), task.exception()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):
            if engine.stats.active == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())


def test_a_request_of_a_higher_priority_takes_a_row_in_the_child(engine):
    """Every row (2 lanes x 2) holds a long request of priority 2: one of priority 0 preempts one
    of them in its lane's process and ends while they run; all are what Generator computes."""
    from fastblt.runtime.generator import Generator

    async def main():
        lows = [asyncio.create_task(engine.generate(PROMPTS[0], mode="ar", max_bytes=1500, stop_on_eos=False,
                                                    priority=2)) for _ in range(4)]  # fmt: skip
        while engine.stats.active < 4:
            await asyncio.sleep(0.01)
        before = engine.stats.preempted
        high = await engine.generate(PROMPTS[3], mode="ar", max_bytes=32, stop_on_eos=False)
        running = sum(not t.done() for t in lows)
        return high, running, engine.stats.preempted - before, await asyncio.gather(*lows)

    high, running, preempted, lows = asyncio.run(main())
    g = Generator("default", backend="ort")
    assert running == 4 and preempted == 1
    assert high.ids == g.generate(PROMPTS[3], mode="ar", max_bytes=32, stop_on_eos=False).ids
    want = g.generate(PROMPTS[0], mode="ar", max_bytes=1500, stop_on_eos=False).ids
    assert all(low.ids == want for low in lows)


def test_a_full_queue_is_refused_at_once():
    eng = AsyncEngine("default", backend="ort", max_batch=2, max_queue=0, lanes=2, processes=True)
    try:

        async def main():
            long = [eng.generate(PROMPTS[0], mode="ar", max_bytes=50_000, stop_on_eos=False) for _ in range(2)]
            tasks = [asyncio.create_task(c) for c in long]
            await asyncio.sleep(0)
            with pytest.raises(EngineBusy, match="max_queue 0"):
                await eng.generate(PROMPTS[1], mode="ar", max_bytes=4)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(main())
    finally:
        eng.close(30)


def test_a_lane_whose_process_dies_fails_its_requests_and_starts_again():
    eng = AsyncEngine("default", backend="ort", max_batch=2, lanes=2, processes=True)
    try:

        async def main():
            first = asyncio.create_task(eng.generate(PROMPTS[0], mode="ar", max_bytes=50_000, stop_on_eos=False))
            while eng.stats.active == 0:
                await asyncio.sleep(0.01)
            victim = next(lane for lane in eng.lanes if lane.load)
            dead = victim.pid
            os.kill(dead, signal.SIGKILL)
            with pytest.raises(LaneLost, match=r"lane process exited \(exit code -9\) before the request"):
                await first  # (an EngineClosed: nothing wrong with the request; the server's 503 lane_lost)
            assert victim.closed and victim.load == 0 and not victim.alive and eng.lanes_alive == 1
            with pytest.raises(LaneLost, match="it takes requests again once its next one is up"):
                victim.submit(eng.request(PROMPTS[1], mode="ar", max_bytes=8))
            alone = await eng.generate(PROMPTS[1], mode="ar", max_bytes=8, stop_on_eos=False)  # the other lane
            for _ in range(600):  # started again after a pause (it died young)
                if victim.alive:
                    break
                await asyncio.sleep(0.05)
            assert victim.alive and victim.pid != dead and victim.restarts == 1 and eng.lanes_alive == 2
            both = await asyncio.gather(*[eng.generate(p, mode="ar", max_bytes=8, stop_on_eos=False)
                                          for p in PROMPTS[1:3]])  # fmt: skip
            assert victim.stats.failed >= 1 and victim.stats.finished >= 1  # counters survive the restart
            return [alone.ids] + [o.ids for o in both]

        ids = asyncio.run(main())
        g = eng.generator
        want = [g.generate(p, mode="ar", max_bytes=8, stop_on_eos=False).ids for p in PROMPTS[1:2] + PROMPTS[1:3]]
        assert ids == want
    finally:
        eng.close(30)


def test_without_its_zygote_a_lane_starts_a_fresh_interpreter():
    eng = AsyncEngine("default", backend="ort", max_batch=2, lanes=2, processes=True)
    try:
        victim = eng.lanes[0]
        dead = victim.pid
        os.kill(eng._zygote.pid, signal.SIGKILL)
        os.kill(dead, signal.SIGKILL)
        for _ in range(600):  # died young: started again after a pause
            if victim.alive and victim.pid != dead:
                break
            time.sleep(0.05)
        assert victim.alive and parent_of(victim.pid) == os.getpid() and name_of(victim.pid) == "fastblt-lane"
        out = asyncio.run(eng.generate(PROMPTS[1], mode="ar", max_bytes=8, stop_on_eos=False))
        assert out.ids == eng.generator.generate(PROMPTS[1], mode="ar", max_bytes=8, stop_on_eos=False).ids
    finally:
        eng.close(30)


def test_closing_ends_the_processes_and_refuses_new_requests():
    eng = AsyncEngine("default", backend="ort", max_batch=2, lanes=2, processes=True)
    pids = [lane.pid for lane in eng.lanes] + [eng._zygote.pid]
    eng.close(30)
    assert all(gone(pid, 10) for pid in pids)
    with pytest.raises(EngineClosed):
        asyncio.run(eng.generate(PROMPTS[0], mode="ar", max_bytes=4))


def test_a_worker_that_stops_reading_blocks_neither_the_event_loop_nor_close():
    """A stopped worker (SIGSTOP: as one stuck in native code or swapped out) keeps getting its
    share of requests until its pipe is full: the event loop still runs (the pipe is written by a
    thread of the lane's own), the metrics do not wait for it twice, and close(timeout) ends in
    about timeout + the cancel grace, the worker killed."""
    writers_before = {t for t in threading.enumerate() if t.name == "fastblt-lane-writer"}  # other engines'
    eng = AsyncEngine("default", backend="ort", max_batch=4, max_queue=64, lanes=2, processes=True)
    stuck = eng.lanes[0].pid
    os.kill(stuck, signal.SIGSTOP)
    try:

        async def main() -> tuple[float, list]:
            beats = [time.monotonic()]

            async def beat() -> None:
                while True:
                    await asyncio.sleep(0.02)
                    beats.append(time.monotonic())

            ticker = asyncio.create_task(beat())
            prompt = "x = 1\n" * 1200  # 7 KB each: the stopped worker's pipe fills after a dozen
            tasks = []
            for _ in range(40):
                tasks.append(asyncio.create_task(eng.generate(prompt, mode="ar", max_bytes=1)))
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            ticker.cancel()
            return max(b - a for a, b in zip(beats, beats[1:], strict=False)), tasks

        stall, tasks = asyncio.run(main())
        assert stall < 3.0, f"the event loop stalled {stall:.1f} s"  # blocked until SIGCONT without the writer
        assert eng.lanes[0].load > 12  # the stopped worker really held its share
        eng.stats  # noqa: B018  # asks the stopped worker once, waits STATS_TIMEOUT
        t0 = time.monotonic()
        eng.stats  # noqa: B018
        assert time.monotonic() - t0 < 1.0  # a worker that left the last question unanswered is not waited for
    finally:
        t0 = time.monotonic()
        eng.lanes[0].close(0.5)  # the stuck lane alone: cancelled after 0.5 s, killed CANCEL_GRACE later
        took_lane = time.monotonic() - t0
        t0 = time.monotonic()
        eng.close(1)
        took = time.monotonic() - t0
    assert took_lane < 0.5 + CANCEL_GRACE + 2, f"the stuck lane's close(0.5) took {took_lane:.1f} s"
    assert took < 10, f"close(1) took {took:.1f} s"
    assert gone(stuck, 10)
    time.sleep(0.2)  # a writer ends on its next message
    writers = {t for t in threading.enumerate() if t.name == "fastblt-lane-writer"} - writers_before
    assert not writers, writers  # every lane's writer stopped with its lane


def test_workers_do_not_outlive_their_parent(tmp_path):
    script = tmp_path / "parent.py"  # no main guard: a worker must not run it again
    script.write_text(
        "import os, fastblt\n"
        "eng = fastblt.AsyncEngine('default', backend='ort', max_batch=2, lanes=2, processes=True)\n"
        "print(' '.join(str(lane.pid) for lane in eng.lanes), eng._zygote.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 3 and all(gone(pid, 20) for pid in pids)  # the workers and their zygote


class _Planned:
    """Stands in for a ProcessLane: records what the engine would start a worker with."""

    started: list[_Planned] = []

    def __init__(self, checkpoint, backend, max_batch, max_queue, max_context, load, zygote=None):
        self.max_batch, self.load_options, self.load, self.alive, self.closed = max_batch, load, 0, True, False
        self.on_change = None
        _Planned.started.append(self)

    def wait_ready(self) -> None:
        pass

    def close(self, timeout=None, cancel=False) -> None:
        self.closed = True

    def wait_closed(self, timeout=None) -> bool:
        return True


@pytest.mark.parametrize(
    ("cores", "lanes", "processes", "memory_mb", "want"),
    [
        (8, None, None, None, (True, [2] * 8, 1, 8)),  # a worker per core, a global thread each, all 8 alone
        (8, 2, None, None, (True, [8, 8], 4, 8)),  # asked for two: half the cores for each global step
        (16, None, None, 700, (False, [16], 16, None)),  # memory for one worker: one lane in this process
        (16, None, True, 700, (True, [16], 16, None)),  # ... unless workers were asked for: one worker
        (2, None, None, None, (True, [8, 8], 1, 2)),  # this machine's kind
    ],
)
def test_the_engine_starts_its_lanes_with_their_share_of_the_cores(monkeypatch, cores, lanes, processes, memory_mb,
                                                                   want):  # fmt: skip
    monkeypatch.setattr(ae, "cpu_cores", lambda: cores)
    monkeypatch.setattr(ae, "memory_available", lambda: None if memory_mb is None else memory_mb << 20)
    monkeypatch.setattr(ae, "ProcessLane", _Planned)
    _Planned.started = []
    eng = AsyncEngine("default", backend="ort", lanes=lanes, processes=processes)
    try:
        workers, rows, global_threads, wide = want
        if not workers:  # the engine's own lane, its global session on the share
            assert not eng.processes and [lane.max_batch for lane in eng.lanes] == rows and not _Planned.started
            backend = eng.generator.engine.backend
            assert backend._sessions["global"].get_session_options().intra_op_num_threads == global_threads
            return
        assert eng.processes and [lane.max_batch for lane in _Planned.started] == rows
        for lane in _Planned.started:
            assert lane.load_options["threads"] == 1 and lane.load_options["global_threads"] == global_threads
            assert lane.load_options.get("wide_global") == wide
    finally:
        eng.close(30)


def test_a_worker_loads_without_the_torch_model_and_with_its_threads(tmp_path):
    """The child's load (in this process): sessions on the threads the engine gave it, the global
    step on its share, a wide session for when it is alone, no torch copy of the weights."""
    from fastblt.engines.ort_backend import WIDE
    from fastblt.runtime import lane_process
    from fastblt.runtime.generator import Generator

    class Out:
        def flush(self) -> None:
            pass

    path = Generator("default", "ort").checkpoint_path
    options = {"threads": 1, "global_threads": 2, "wide_global": 3}
    gen, batch = lane_process._load(path, "ort", 2, 4, None, options, Out(), [True])
    try:
        threads = {k: s.get_session_options().intra_op_num_threads for k, s in gen.engine.backend._sessions.items()}
        assert threads.pop("global") == 2 and threads.pop(WIDE) == 3 and set(threads.values()) == {1}
        assert gen.model is None
    finally:
        batch.close(10)
        gen.close()


def test_processes_default_and_refusals(monkeypatch):
    monkeypatch.setattr(ae, "cpu_cores", lambda: 2)
    model = tiny_model("small-window")
    eng = AsyncEngine(model, backend="torch", max_batch=2, lanes=2)
    try:
        assert not eng.processes  # a model object has no path a worker could load
    finally:
        eng.close(30)
    with pytest.raises(InputError, match="processes"):
        AsyncEngine(model, backend="torch", max_batch=2, lanes=2, processes=True)
