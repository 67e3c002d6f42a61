"""AsyncEngine: awaited and streamed requests equal Generator's, cancellation frees the row."""

from __future__ import annotations

import asyncio

import pytest
from runtime_refs import PROMPTS, tiny_model

from fastblt.errors import EngineBusy, InputError
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
    try:
        outs = asyncio.run(main())
    finally:
        engine.batch.max_queue = 2
    assert [o.ids for o in outs] == [g.generate(p, mode=m, max_bytes=20, stop_on_eos=False).ids for p, m in work]


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
        while engine.stats.active == 0:
            await asyncio.sleep(0.005)
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
        for s in streams:
            await s.aclose()

    asyncio.run(main())
