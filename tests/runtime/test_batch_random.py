"""Random batches against requests alone: arrivals while others decode, every mode, greedy and
seeded sampling, k, stop strings, prefill chunks, prompts past the rings' windows, cancellations,
priorities (requests preempted and resumed) and batch sizes from 2 to 8. Every request that
finishes equals Generator.generate alone.

A seeded walk over what the targeted tests in test_batch.py take one at a time: the rows a
sequence moves between, the mirror rows of the global step, cohorts parking and drafting from the
context, all at once."""

from __future__ import annotations

import random
import time

import pytest
from runtime_refs import PROMPTS, torch_generator

from fastblt.errors import Cancelled
from fastblt.runtime.batch import BatchEngine
from fastblt.runtime.options import make_request

MODES = ("ar", "blt-s", "blt-d", "blt-dv")
LONG = (PROMPTS[3] * 9).encode()[:200]  # past the small-window rings (8 bytes) and a global bucket


def random_request(rng: random.Random) -> tuple[bytes, str, dict]:
    base = rng.choice([*(p.encode() if isinstance(p, str) else p for p in PROMPTS), LONG, b"ab" * 30])
    prompt = base[: rng.choice([1, 2, 5, 17, 33, len(base)])] or b"x"
    mode = rng.choice(MODES)
    opts: dict = {"max_bytes": rng.choice([1, 2, 9, 24]), "stop_on_eos": rng.random() < 0.5}
    if rng.random() < 0.4:
        opts |= {"temperature": rng.choice([0.7, 1.0]), "seed": rng.randrange(1000), "top_k": rng.choice([None, 5])}
    if mode in ("blt-s", "blt-dv") and rng.random() < 0.5 and "temperature" not in opts:
        opts["lookup"] = rng.choice([0, 1, 3])
    if mode == "blt-s" and rng.random() < 0.5:
        opts["k"] = rng.choice([1, 3, 8])
    if rng.random() < 0.25:
        opts["stop"] = [rng.choice([b"a", b"\x00", b"n("])]
    if rng.random() < 0.2:
        opts["prefill_chunk"] = rng.choice([1, 3, 7])
    if rng.random() < 0.5:  # a later request of a lower number takes a running one's row
        opts["priority"] = rng.choice([-1, 1, 2])
    return prompt, mode, opts


@pytest.mark.parametrize(("name", "seed"), [("hf-test-sizes", 0), ("small-window", 1), ("deep-local", 2)])
def test_random_batches_equal_requests_alone(name, seed):
    compared, cancelled, preempted = walk(torch_generator(name), [random.Random(seed)] * 8)
    assert compared >= 40 and compared + cancelled >= 48 and preempted >= 1


def test_preempted_requests_resume_with_every_cache_they_left():
    """Batches of this walk (small-window: 8-byte rings, rows moving at every join and leave) in
    which a preempted request's row, with its global cache lent to that row of the batch's mirror,
    went to another request that then moved: the move must carry that request's cache, never the
    preempted one's (cut to the other's length). These seeds' batches preempt 6-7 requests on an idle
    machine (fewer where arrivals fall otherwise: their timing is the machine's)."""
    g = torch_generator("small-window")
    _, _, preempted = walk(g, [random.Random(seed) for seed in (38, 50, 93, 101, 130)])
    assert preempted >= 1


def walk(g, rngs: list[random.Random]) -> tuple[int, int, int]:
    """One batch of random requests per rng (arriving while others decode, some cancelled), every
    finished one compared with Generator alone: (compared, cancelled, preempted)."""
    compared = cancelled = preempted = 0
    for rng in rngs:
        work = [random_request(rng) for _ in range(rng.randrange(6, 14))]
        with BatchEngine(g.engine, max_batch=rng.choice([2, 3, 5, 8]), max_queue=64) as batch:
            tickets = []
            for prompt, mode, opts in work:
                tickets.append(batch.submit(make_request(prompt, g.config, mode, **opts)))
                if rng.random() < 0.3:
                    time.sleep(rng.random() * 0.02)  # arrive while others decode
            stop = {i for i in range(len(tickets)) if rng.random() < 0.1}
            for i in stop:
                tickets[i].cancel()
            for i, ((prompt, mode, opts), ticket) in enumerate(zip(work, tickets, strict=True)):
                try:
                    got = ticket.result(120)
                except Cancelled:
                    assert i in stop
                    cancelled += 1
                    continue
                want = g.generate(prompt, mode=mode, **opts)
                assert (got.ids, got.stop_reason) == (want.ids, want.stop_reason), (prompt, mode, opts)
                compared += 1
            assert batch.stats.active == 0
            preempted += batch.stats.preempted
    return compared, cancelled, preempted
