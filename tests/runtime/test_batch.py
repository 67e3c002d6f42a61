"""The batch engine: every request's output equals its batch-1 Generator output, whatever else is
in the batch (modes, lengths, sampling, cancellations, failures), and rows are really shared."""

from __future__ import annotations

import dataclasses
import random
import time

import pytest
from runtime_refs import PROMPTS, tiny_model, torch_generator

from fastblt.errors import Cancelled, EngineBusy, EngineClosed, InputError, InternalError
from fastblt.runtime.batch import BatchEngine
from fastblt.runtime.generator import Generator
from fastblt.runtime.options import make_request

MODES = ("ar", "blt-s", "blt-d", "blt-dv")


def batch_of(gen: Generator, max_batch: int = 8, max_queue: int = 64) -> BatchEngine:
    return BatchEngine(gen.engine, max_batch, max_queue, backend_name=gen.backend_name, params=gen.params)


def hold_the_row(batch: BatchEngine, g: Generator):
    """A request that holds a one-row batch's row until it is cancelled, once it does."""
    first = batch.submit(make_request(PROMPTS[0], g.config, "ar", 20_000, stop_on_eos=False))
    deadline = time.time() + 10
    while batch.stats.active == 0 and time.time() < deadline:
        time.sleep(0.005)
    return first


def jobs(n: int, seed: int = 0) -> list[tuple[bytes | str, str, int, dict]]:
    """n requests of mixed prompts, modes, lengths and options (a fifth steered: logit bias, penalties;
    some in JSON mode, some held to a regex)."""
    rng = random.Random(seed)
    prompts = [*PROMPTS, PROMPTS[5] * 2, PROMPTS[3] * 9]  # long ones: global caches past one bucket
    out = []
    for i in range(n):
        prompt = prompts[i % len(prompts)]
        mode = MODES[(i // len(PROMPTS)) % len(MODES)] if i < 24 else rng.choice(MODES)
        options: dict = {"stop_on_eos": False}
        if rng.random() < 0.3:
            options |= {"temperature": 0.9, "top_k": 20, "seed": rng.randrange(1000)}
        if mode == "blt-s" and rng.random() < 0.5:
            options["k"] = rng.choice([2, 5])
        n = rng.choice([7, 19, 33])
        if i % 5 == 4:  # rows of one call, each with its own logit bias and penalties (or none)
            options["logit_bias"] = {rng.randrange(256): rng.choice([-100.0, 4.0]) for _ in range(6)}
            options["frequency_penalty"] = rng.choice([0.0, 1.5])
            options["presence_penalty"] = rng.choice([-0.5, 0.0, 1.0])
        if i % 7 == 3 and mode != "blt-d":  # JSON mode: each row its own grammar state
            options["format"] = "json"
        elif i % 7 == 5 and mode != "blt-d":  # a regex over the whole text
            options["pattern"] = r"[a-z ]{3,12}(\.|!)"
        out.append((prompt, mode, n, options))
    return out


@pytest.mark.parametrize("name", ["hf-test-sizes", "small-window"])
def test_batched_outputs_equal_batch_one_outputs(name):
    """Mixed modes, prompts, lengths and seeded sampling in batches of 8 (rows refilled as requests
    end): each request's ids equal what Generator.generate gives it alone."""
    g = torch_generator(name)
    work = jobs(40, seed=1 if name == "small-window" else 0)
    want = [g.generate(p, mode=m, max_bytes=n, **o).ids for p, m, n, o in work]
    with batch_of(g, max_batch=8) as batch:
        tickets = [batch.submit(make_request(p, g.config, m, n, **o)) for p, m, n, o in work]
        got = [t.result(120).ids for t in tickets]
        stats = batch.stats
    assert got == want
    assert stats.finished == len(work) and stats.active == 0
    assert stats.rows["decoder"] > 1.5 * stats.calls["decoder"]  # rows were shared, not run one by one


def test_a_request_whose_state_cannot_be_made_fails_alone(monkeypatch):
    """An allocation that fails while a request is admitted (out of memory) ends that request with
    the error; it neither hangs its caller nor fails the requests beside it."""
    import fastblt.runtime.batch as batch_module

    g, made = torch_generator(), []
    real = batch_module.SequenceState

    def second_fails(*args, **kwargs):
        made.append(1)
        if len(made) == 2:
            raise MemoryError("no memory for the caches")
        return real(*args, **kwargs)

    monkeypatch.setattr(batch_module, "SequenceState", second_fails)
    with batch_of(g, max_batch=4) as batch:
        tickets = [batch.submit(make_request(PROMPTS[0], g.config, "ar", 8, stop_on_eos=False)) for _ in range(3)]
        want = g.generate(PROMPTS[0], mode="ar", max_bytes=8, stop_on_eos=False).ids
        assert tickets[0].result(60).ids == want and tickets[2].result(60).ids == want
        tickets[0].cancel()  # after it finished: it stays finished, not cancelled
        assert not tickets[0].cancelled and tickets[0].result(0).ids == want
        with pytest.raises(InternalError, match="MemoryError"):
            tickets[1].result(60)
        assert batch.stats.failed == 1


def test_identical_prompts_in_one_batch_continue_identically():
    """Meta's blt issue #123 (batched patching changed greedy output) does not happen here."""
    g = torch_generator("small-window")
    with batch_of(g, max_batch=6) as batch:
        tickets = [batch.submit(make_request(PROMPTS[3], g.config, "ar", 40, stop_on_eos=False)) for _ in range(6)]
        outs = [t.result(60).ids for t in tickets]
    assert all(o == outs[0] for o in outs)
    assert outs[0] == g.generate(PROMPTS[3], mode="ar", max_bytes=40, stop_on_eos=False).ids


def test_choices_of_one_prompt_prefill_once():
    """Requests of one prompt admitted while it prefills (n choices of a completion) take a copy of
    that prefill: each still equals its batch-1 output, in every mode, greedy or sampled, with its
    prompt scored; a request prefilling in other chunks, or scoring the prompt otherwise, or of
    another prompt runs its own."""
    g = torch_generator()
    prompt = PROMPTS[5] * 2  # several prefill chunks, a patch open at its end
    work = [(prompt, m, {"temperature": t, "seed": s, "prompt_logprobs": 2})
            for m in MODES for t, s in ((0.0, None), (0.9, 7))]  # fmt: skip
    work += [(prompt, "ar", {"prefill_chunk": 5, "prompt_logprobs": 2}), (prompt, "ar", {"prompt_logprobs": 1}),
             (prompt + "#", "ar", {"prompt_logprobs": 2})]  # fmt: skip
    want = [g.generate(p, mode=m, max_bytes=24, stop_on_eos=False, **o) for p, m, o in work]
    with batch_of(g, max_batch=len(work)) as batch:
        with batch._cv:  # admitted at one turn, the first one's prefill not begun
            tickets = [batch.submit(make_request(p, g.config, m, 24, stop_on_eos=False, **o)) for p, m, o in work]
        got = [t.result(120) for t in tickets]
        assert batch.stats.shared_prefills == 7  # the first eight share one prefill
    for w, o in zip(want, got, strict=True):
        assert o.ids == w.ids and len(o.prompt_logprobs) == len(w.prompt_logprobs)
        # a batched call may round a row's last digits differently from batch 1 on some CPUs
        assert max(abs(a - b) for a, b in zip(o.prompt_logprobs, w.prompt_logprobs, strict=True)) < 1e-5
    for o in got[1:8]:  # a copy of the first one's
        assert o.prompt_logprobs == got[0].prompt_logprobs and o.prompt_top_logprobs == got[0].prompt_top_logprobs
    ran = [sum(o.stats.prefill_passes.values()) > 0 for o in got]
    assert ran == [True] + [False] * 7 + [True] * 3


def test_a_request_waiting_for_a_prefill_whose_request_leaves_runs_its_own():
    """Its leader cancelled in the middle of the prefill: the request waiting for a copy prefills
    the prompt itself and still equals its batch-1 output."""
    g = torch_generator()
    opts = dict(stop_on_eos=False, prefill_chunk=1)  # a prefill of ~200 decoder turns: time to cancel in
    want = g.generate(PROMPTS[3] * 10, mode="ar", max_bytes=16, **opts).ids
    with batch_of(g, max_batch=2) as batch:
        with batch._cv:
            first, second = (batch.submit(make_request(PROMPTS[3] * 10, g.config, "ar", 16, **opts)) for _ in range(2))
        deadline = time.monotonic() + 60
        while batch.live[:1] == [] or batch.live[0].state.n < 8:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert batch.live[1].leader is batch.live[0]  # waiting for the first one's prefill
        first.cancel()
        assert second.result(120).ids == want
        assert batch.stats.shared_prefills == 0
    with pytest.raises(Cancelled):
        first.result(0)


def test_a_request_arriving_after_the_prefill_ended_runs_its_own():
    """Once a request's prefill has ended its state moves on: a request of the same prompt that
    arrives then prefills the prompt itself."""
    import threading

    g = torch_generator()
    want = g.generate(PROMPTS[5], mode="ar", max_bytes=40, stop_on_eos=False).ids
    decoding = threading.Event()
    with batch_of(g, max_batch=2) as batch:
        first = batch.submit(make_request(PROMPTS[5], g.config, "ar", 40, stop_on_eos=False),
                             on_text=lambda _: decoding.set())  # fmt: skip
        assert decoding.wait(60)
        second = batch.submit(make_request(PROMPTS[5], g.config, "ar", 40, stop_on_eos=False))
        assert first.result(60).ids == want and second.result(60).ids == want
        assert batch.stats.shared_prefills == 0


def test_a_copy_of_a_prefill_that_fails_fails_its_request_alone(monkeypatch):
    """Out of memory while copying the leader's state: that request fails, the leader and the
    other followers finish as they would alone."""
    from fastblt.runtime.state import SequenceState

    g = torch_generator()
    real, copies = SequenceState.copy_from, []

    def second_fails(self, src):
        copies.append(1)
        if len(copies) == 2:
            raise MemoryError("no memory for the copy")
        real(self, src)

    monkeypatch.setattr(SequenceState, "copy_from", second_fails)
    want = g.generate(PROMPTS[5], mode="ar", max_bytes=12, stop_on_eos=False).ids
    with batch_of(g, max_batch=4) as batch:
        with batch._cv:
            tickets = [batch.submit(make_request(PROMPTS[5], g.config, "ar", 12, stop_on_eos=False)) for _ in range(4)]
        with pytest.raises(InternalError, match="MemoryError"):
            tickets[2].result(60)
        assert [tickets[i].result(60).ids for i in (0, 1, 3)] == [want] * 3
        assert batch.stats.failed == 1 and batch.stats.finished == 3


def test_ar_rows_step_together():
    """Same-mode rows take the same step at the same turn: one decoder call serves all of them."""
    g = torch_generator()
    with batch_of(g, max_batch=4) as batch:
        tickets = [batch.submit(make_request(p, g.config, "ar", 30, stop_on_eos=False)) for p in PROMPTS[:4]]
        [t.result(60) for t in tickets]
        s = batch.stats
    assert s.rows["decoder"] / s.calls["decoder"] > 3.0
    assert s.rows["global"] / s.calls["global"] > 1.0  # patches closing in different rows share a call


def test_blt_s_rows_start_their_rounds_together():
    """A cohort's rows wait for each other at the end of a round, so rows that finished their
    prefills at different turns (prompts of 1 to 5 prefill chunks) still draft and verify in the
    same turns: their verify passes share entropy steps, their drafts decoder calls. Rows that
    each started a round as soon as they could would drift apart and run them one by one."""
    g = torch_generator()
    prompts = [PROMPTS[3] * n for n in (1, 3, 5, 7)]
    with batch_of(g, max_batch=4) as batch:
        with batch._cv:  # all four are admitted at the same turn
            tickets = [batch.submit(make_request(p, g.config, "blt-s", 80, stop_on_eos=False)) for p in prompts]
        [t.result(60) for t in tickets]
        s = batch.stats
    assert s.rows["entropy"] / s.calls["entropy"] > 1.6
    assert s.rows["decoder"] / s.calls["decoder"] > 2.8


def test_streamed_text_is_the_generation():
    g = torch_generator()
    chunks: list[str] = []
    with batch_of(g) as batch:
        t = batch.submit(make_request(PROMPTS[1], g.config, "blt-s", 30, stop=["o"]), on_text=chunks.append)
        out = t.result(60)
    assert "".join(chunks) == out.text
    assert out.text == g.generate(PROMPTS[1], mode="blt-s", max_bytes=30, stop=["o"]).text


def test_a_listener_that_fails_cancels_its_request():
    """An `on_text` callback that raises has lost its consumer: the request is cancelled at once
    (its row freed) instead of decoding on, unread, to max_bytes."""
    g = torch_generator()
    calls = []

    def gone(text: str) -> None:
        calls.append(text)
        raise ConnectionResetError("the client went away")

    with batch_of(g) as batch:
        before = batch.stats.cancelled
        t = batch.submit(make_request(PROMPTS[0], g.config, "ar", 10_000, stop_on_eos=False), on_text=gone)
        with pytest.raises(Cancelled):
            t.result(60)
        assert len(calls) == 1 and batch.stats.cancelled == before + 1


def test_a_finished_request_cancelled_before_it_is_retired_keeps_its_generation(monkeypatch):
    """A request that met its stop condition is finished, even when its ticket is cancelled (by
    close(timeout), or its caller) in the same turn, before the batch retires it: it returns its
    Generation, not Cancelled, and counts as finished."""
    g = torch_generator()
    retire = BatchEngine._retire

    def cancel_first(self):
        for seq in self.live:
            if seq.ended and seq.ticket.error is None:
                seq.ticket.cancel()
                assert seq.ticket.cancelled  # not done yet: the flag is set
        retire(self)

    monkeypatch.setattr(BatchEngine, "_retire", cancel_first)
    work = [(p, m) for p in PROMPTS[:2] for m in ("ar", "blt-s", "blt-d")]
    with batch_of(g) as batch:
        tickets = [batch.submit(make_request(p, g.config, m, 12, stop_on_eos=False)) for p, m in work]
        got = [t.result(60).ids for t in tickets]
        assert batch.stats.finished == len(work) and batch.stats.cancelled == 0
    assert got == [g.generate(p, mode=m, max_bytes=12, stop_on_eos=False).ids for p, m in work]


def test_a_cancelled_request_leaves_and_the_others_stay_exact():
    g = torch_generator("small-window")
    with batch_of(g, max_batch=4) as batch:
        long = batch.submit(make_request(PROMPTS[0], g.config, "ar", 5000, stop_on_eos=False))
        others = [batch.submit(make_request(p, g.config, "blt-s", 25, stop_on_eos=False)) for p in PROMPTS[1:4]]
        time.sleep(0.05)
        long.cancel()
        with pytest.raises(Cancelled):
            long.result(30)
        outs = [t.result(60).ids for t in others]
        deadline = time.time() + 10
        while batch.stats.active and time.time() < deadline:
            time.sleep(0.01)
        assert batch.stats.active == 0 and batch.stats.cancelled == 1
        assert batch.stats.generated >= sum(len(o) for o in outs)  # the cancelled one's ids too, if any
    assert outs == [g.generate(p, mode="blt-s", max_bytes=25, stop_on_eos=False).ids for p in PROMPTS[1:4]]


def test_a_failing_request_fails_alone():
    """A prompt past the global model's position limit fails with its InputError; the requests
    beside it finish exactly."""
    base = tiny_model("small-window")
    cfg = base.config
    model = type(base)(dataclasses.replace(cfg, global_model=dataclasses.replace(cfg.global_model, max_positions=24)))
    model.load_state_dict(base.state_dict())
    g = Generator(model.eval(), backend="torch")
    with batch_of(g, max_batch=3) as batch:
        bad = batch.submit(make_request("x" * 300, g.config, "ar", 10))
        good = [batch.submit(make_request(p, g.config, "ar", 12, stop_on_eos=False)) for p in ("ab", "cd")]
        with pytest.raises(InputError, match="global model's limit"):
            bad.result(60)
        outs = [t.result(60).ids for t in good]
        assert batch.stats.failed == 1
    assert outs == [g.generate(p, mode="ar", max_bytes=12, stop_on_eos=False).ids for p in ("ab", "cd")]


def test_a_full_queue_refuses_and_a_closed_engine_refuses():
    g = torch_generator()
    batch = batch_of(g, max_batch=1, max_queue=1)
    req = make_request(PROMPTS[0], g.config, "ar", 200, stop_on_eos=False)
    first = hold_the_row(batch, g)
    second = batch.submit(req)  # waits in the queue
    with pytest.raises(EngineBusy, match="max_queue 1"):
        batch.submit(req)
    first.cancel()
    batch.close(30)  # finishes what was admitted or queued
    assert second.result(0).ids == g.generate(PROMPTS[0], mode="ar", max_bytes=200, stop_on_eos=False).ids
    with pytest.raises(EngineClosed):
        batch.submit(req)


def test_a_request_cancelled_while_queued_leaves_the_queue_at_once():
    """A waiting request whose caller gave up ends at the next turn, with every row still busy, so
    it no longer counts against max_queue."""
    g = torch_generator()
    batch = batch_of(g, max_batch=1, max_queue=1)
    first = hold_the_row(batch, g)
    req = make_request(PROMPTS[1], g.config, "ar", 30, stop_on_eos=False)
    gone = batch.submit(req)
    gone.cancel()
    with pytest.raises(Cancelled, match="while queued"):
        gone.result(10)
    assert not first.done and batch.stats.queued == 0 and batch.stats.cancelled == 1
    waiting = batch.submit(req)  # the place is free again
    first.cancel()
    assert waiting.result(60).ids == g.generate(PROMPTS[1], mode="ar", max_bytes=30, stop_on_eos=False).ids
    batch.close(30)


def test_waiting_requests_take_rows_by_priority_then_in_arrival_order():
    g = torch_generator()
    batch = batch_of(g, max_batch=1, max_queue=8)
    first = hold_the_row(batch, g)
    ended: list[str] = []
    tickets = {}
    for name, priority in (("b", 0), ("c", -1), ("d", 1), ("e", 0), ("f", -1)):
        req = make_request(PROMPTS[1], g.config, "ar", 4, priority=priority)
        tickets[name] = batch.submit(req, on_done=lambda t, name=name: ended.append(name))
    first.cancel()
    for t in tickets.values():
        t.result(60)
    batch.close(30)
    assert ended == ["c", "f", "b", "e", "d"]
    want = g.generate(PROMPTS[1], mode="ar", max_bytes=4).ids
    assert all(t.result(0).ids == want for t in tickets.values())  # an order, never a difference


@pytest.mark.parametrize("mode", MODES)
def test_a_higher_priority_takes_a_running_requests_row_and_that_one_resumes_exactly(mode):
    """A request of priority 3 holds the only row; once it has streamed text, one of priority 0
    comes: it takes the row at the end of the first's round and ends first; the first then resumes
    where it stopped. Both, seeded and sampled, are what each computes alone."""
    g = torch_generator()
    sampled = {"temperature": 0.9, "seed": 7, "stop_on_eos": False}
    batch = batch_of(g, max_batch=1, max_queue=8)
    ended: list[str] = []
    high: list = []

    def on_text(text: str) -> None:  # the first has begun: a request of a higher priority comes
        if not high:
            req = make_request(PROMPTS[3], g.config, mode, 24, **sampled)
            high.append(batch.submit(req, on_done=lambda t: ended.append("high")))

    low_req = make_request(PROMPTS[0], g.config, mode, 200, priority=3, **sampled)
    low = batch.submit(low_req, on_text=on_text, on_done=lambda t: ended.append("low"))
    got = low.result(120).ids, high[0].result(120).ids
    batch.close(30)
    assert ended == ["high", "low"] and batch.stats.preempted == 1
    assert got == (g.generate(PROMPTS[0], mode=mode, max_bytes=200, **sampled).ids,
                   g.generate(PROMPTS[3], mode=mode, max_bytes=24, **sampled).ids)  # fmt: skip


def test_a_preempted_request_cancelled_while_it_waits_ends_at_once():
    g = torch_generator()
    batch = batch_of(g, max_batch=1, max_queue=8)
    high: list = []

    def on_text(text: str) -> None:
        if not high:
            high.append(batch.submit(make_request(PROMPTS[3], g.config, "ar", 200, stop_on_eos=False)))

    low = batch.submit(make_request(PROMPTS[0], g.config, "ar", 200, priority=1, stop_on_eos=False), on_text=on_text)
    deadline = time.time() + 30
    while batch.stats.preempted == 0 and time.time() < deadline:
        time.sleep(0.002)
    low.cancel()
    with pytest.raises(Cancelled):
        low.result(30)
    assert high[0].result(60).ids == g.generate(PROMPTS[3], mode="ar", max_bytes=200, stop_on_eos=False).ids
    batch.close(30)
    assert batch.stats.cancelled == 1 and batch.stats.queued == 0 and batch.stats.active == 0


def test_requests_are_checked_against_the_graphs_before_they_queue():
    g = torch_generator()
    with batch_of(g) as batch, pytest.raises(InputError, match="prefill_chunk"):
        batch.submit(make_request("x", g.config, "ar", 4, prefill_chunk=10_000))
    with pytest.raises(InputError, match="max_batch"):
        BatchEngine(g.engine, max_batch=0)


def padded_global_step(g: Generator):
    """One global call over two rows, 1 patch at slot 62 (its own cache: 64 slots) and 7 patches at
    slot 0, and the first row's call run alone: (batched, alone) caches of the first row."""
    import torch

    from fastblt.runtime.caches import RowCaches
    from fastblt.runtime.calls import StepRunner
    from fastblt.runtime.state import SequenceState

    backend, config = g.engine.backend, g.config
    rows = RowCaches(backend.specs, config, 2, torch.float32, backend.device)
    a, b = (SequenceState(backend, config, rows=rows, row=i) for i in range(2))
    alone = SequenceState(backend, config)
    h = torch.randn(64, config.encoder.dim, generator=torch.Generator().manual_seed(1))
    for st in (a, b, alone):  # the same byte states, every cache empty
        st._room(64)
        st.h[:64] = h.to(st.dtype)
    calls = [next(a.run_global([(0, 3)], 62)), next(b.run_global([(i, i + 2) for i in range(7)], 0))]
    StepRunner(backend, 2).run(calls)
    alone.run(alone.run_global([(0, 3)], 62))
    return a, alone


def test_a_global_step_pads_rows_inside_its_scratch_only():
    """Rows of one global call carry different patch counts: the short row's padding lands in the
    gathered scratch (past its own cache's end, here), and what it writes of its own matches the
    same call run alone (torch's kernels round a padded batch differently: within 1e-5; the ort
    backend is bit-exact, tests/runtime/test_ort.py)."""
    import torch

    a, alone = padded_global_step(torch_generator("small-window"))
    for (k, v), (k1, v1) in zip(a.linear["global"].kv, alone.linear["global"].kv, strict=True):
        assert k.shape[2] == 64
        assert torch.allclose(k[:, :, 62], k1[:, :, 62], atol=1e-5) and torch.allclose(
            v[:, :, 62], v1[:, :, 62], atol=1e-5
        )


def test_ring_slots_are_a_slice_unless_they_wrap():
    """The cross ring slots a global call copies back: a slice when they do not wrap, else a list;
    either way the slots of the positions, in order."""
    import torch

    from fastblt.runtime.calls import _ring_slots

    ring = torch.arange(34)
    for at, size in [(0, 1), (5, 7), (62, 1), (33, 1), (31, 5), (100, 30)]:
        slots = _ring_slots(at, size, 34)
        assert isinstance(slots, slice) == ((at % 34) + size <= 34)
        assert ring[slots].tolist() == [(at + j) % 34 for j in range(size)]


@pytest.mark.parametrize("pad_work", [0.0, float("inf")])
def test_global_steps_over_row_ranges_equal_gathered_ones(monkeypatch, pad_work):
    """A batch's global steps run over the range of rows their callers span, on the mirror of the
    batch's linear caches (padding rows in between written past what they read, a blt-d row's
    forced latent among them), or gather the callers' caches (PAD_WORK 0: never a range): either
    way every request's ids equal Generator's, and with ranges some calls really were padded."""
    from fastblt.runtime import calls as calls_module

    monkeypatch.setattr(calls_module, "PAD_WORK", pad_work)
    padded, forced = [], []
    cover = calls_module.StepRunner._cover

    def spy(self, plan, calls, neighbours):
        full = cover(self, plan, calls, neighbours)
        pads = [c for c in full or [] if c.size == 0]
        padded.append(len(pads))
        forced.extend(c.state._forced_at is not None for c in pads)
        return full

    monkeypatch.setattr(calls_module.StepRunner, "_cover", spy)
    g = torch_generator("small-window")
    work = jobs(32, seed=3)
    want = [g.generate(p, mode=m, max_bytes=n, **o).ids for p, m, n, o in work]
    with batch_of(g, max_batch=8) as batch:
        got = [t.result(120).ids for t in [batch.submit(make_request(p, g.config, m, n, **o)) for p, m, n, o in work]]
        deadline = time.monotonic() + 10  # an empty batch lets go of its mirror (sized to its longest context)
        while batch.runner._mirrors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not batch.runner._mirrors and not batch.runner._scratch
    assert got == want
    if pad_work:
        assert sum(padded) > 10 and any(forced)  # padding rows, one of them holding a forced latent
    else:
        assert padded and not any(padded)


def test_a_mirror_grows_only_within_its_share_of_free_memory(monkeypatch):
    """Where growing the global step's mirror would take more than MIRROR_SHARE of the memory
    left, it stays as it is and the batch gathers its callers' caches: outputs are the same."""
    from fastblt.runtime import caches

    caps = []
    reserve = caches.MirrorRows.reserve

    def spy(self, end, rows=1):
        ok = reserve(self, end, rows)
        caps.append((end, self.cap, ok))
        return ok

    monkeypatch.setattr(caches.MirrorRows, "reserve", spy)
    monkeypatch.setattr(caches, "available_memory", lambda device: 1)  # nothing left to grow into
    g = torch_generator("small-window")
    work = jobs(24, seed=5)
    want = [g.generate(p, mode=m, max_bytes=n, **o).ids for p, m, n, o in work]
    with batch_of(g, max_batch=8) as batch:
        got = [t.result(120).ids for t in [batch.submit(make_request(p, g.config, m, n, **o)) for p, m, n, o in work]]
    assert got == want
    first = caps[0][1]
    assert all(cap == first for _, cap, _ in caps)  # never grew
    assert any(end > cap and not ok for end, cap, ok in caps)  # and was asked to


def test_a_cache_lent_to_a_mirror_row_is_that_row_and_is_copied_only_when_it_changes_hands(monkeypatch):
    """MirrorRows: a sequence's cache lent to a row is copied in once and is that row from then on
    (its own buffers let go: the batch holds it once); padding by its own sequence keeps it there,
    another sequence's padding or sync gives it its own buffers back with the row's slots; a
    sequence the batch moves takes its row along (or, synced in another row, is copied from its
    old one: 1,000 batched requests found 3 that differed when a row left behind was trusted);
    growth and shrinking keep every lent row and re-point its cache; rows grow as the batch needs
    them and go when under half are live; past the position limit, or the memory share, the cache
    grows on its own."""
    import torch

    from fastblt.model.config import StackConfig
    from fastblt.runtime import caches
    from fastblt.runtime.caches import LinearCache, MirrorRows

    cfg = StackConfig(dim=8, n_layers=1, n_heads=2, ffn_dim=8, max_positions=256)
    mirror = MirrorRows(cfg, 3, torch.float32, torch.device("cpu"))
    a, b = (LinearCache(cfg, torch.float32, torch.device("cpu")) for _ in range(2))
    for cache, value in ((a, 1.0), (b, 2.0)):
        cache.for_step(40)
        for k, v in cache.kv:
            k.fill_(value)
            v.fill_(-value)

    def mk(row: int) -> torch.Tensor:
        return mirror.kv[0][0][row]

    def is_row(cache: LinearCache, row: int) -> bool:
        return cache.lent == (mirror, row) and cache.kv[0][0].data_ptr() == mk(row).data_ptr()

    assert mirror.rows == 1 and mirror.reserve(40, 3) and mirror.rows == 3  # rows as the batch needs them
    mirror.sync(0, a, 30)
    assert is_row(a, 0) and mirror.owners[0] is a
    assert (mk(0)[:, :30] == 1).all() and (mk(0)[:, 30:] == 0).all() and (mirror.kv[0][1][0, :, :30] == -1).all()
    mk(0)[:, :30] = 5.0  # a step writing the row writes the cache
    mirror.sync(0, a, 30)  # copies nothing
    assert (a.kv[0][0][0, :, :30] == 5).all()
    mirror.lend(0, a)  # its own sequence as padding: still lent
    assert is_row(a, 0)
    mirror.lend(0, b)  # another sequence's padding: a gets its slots back first
    assert a.lent is None and mirror.owners[0] is None and (a.kv[0][0][0, :, :30] == 5).all()
    mk(0).fill_(9.0)
    assert (a.kv[0][0][0, :, :30] == 5).all()  # its own buffers now
    mirror.sync(0, a, 30)
    assert is_row(a, 0) and (mk(0)[:, :30] == 5).all()
    a.reset()  # a new sequence on the same cache: its own bucket again, the row lent to no one
    assert a.lent is None and mirror.owners[0] is None and a.slots == caches.PAST_BUCKET and (a.kv[0][0] == 0).all()
    mirror.sync(1, b, 40)
    mirror.sync(2, b, 40)  # b moved to row 2 (the batch moves rows): copied from row 1
    assert is_row(b, 2) and mirror.owners[1] is None and (mk(2)[:, :40] == 2).all()
    mk(1).fill_(9.0)  # row 1 is no one's now
    mirror.sync(1, b, 40)  # back in row 1
    assert is_row(b, 1) and (mk(1)[:, :40] == 2).all() and mirror.owners[2] is None
    mirror.sync(1, a, 1)  # another sequence takes b's row: b takes its slots back
    assert is_row(a, 1) and b.lent is None and (b.kv[0][0][0, :, :40] == 2).all()
    mirror.sync(0, b, 40)
    mk(2).fill_(9.0)
    mirror.move(0, 2, 40)  # the batch moves b: its row goes along, below its free slot
    assert is_row(b, 2) and mirror.owners[0] is None and (mk(2)[:, :40] == 2).all() and (mk(2)[:, 40:] == 9).all()
    mirror.move(0, 1, 40)  # nothing lent to row 0: nothing moves
    assert is_row(a, 1) and is_row(b, 2)
    assert mirror.reserve(200) and mirror.cap >= 200
    # growth kept every row and re-pointed the cache lent to it
    assert is_row(b, 2) and b.slots == mirror.cap and (b.kv[0][0][0, :, :40] == 2).all()
    cap = mirror.cap
    mirror.fit(cap // 2 + 1, 3)  # live rows still need over half of it: kept
    assert mirror.cap == cap and mirror.rows == 3
    mirror.fit(40, 3)  # the long one left: shrunk to what the live rows read, their slots kept
    assert mirror.cap < cap and mirror.cap >= 40 and is_row(b, 2) and (b.kv[0][0][0, :, :40] == 2).all()
    b.for_step(mirror.cap + 1)  # a lent cache that needs more slots grows its mirror
    assert is_row(b, 2) and b.slots >= 41 and mirror.cap == b.slots
    assert not mirror.reserve(257 + 64)  # past the position limit (rounded to a bucket)
    monkeypatch.setattr(caches, "available_memory", lambda device: 1)  # no memory left to grow the mirror
    need = mirror.cap + 1
    b.for_step(need)  # grows on its own instead, its slots kept
    assert b.lent is None and mirror.owners[2] is None and b.slots >= need and (b.kv[0][0][0, :, :40] == 2).all()
    monkeypatch.undo()
    mirror.sync(2, b, 40)
    mirror.fit(40, 1)  # one live row left: rows 1 and 2 go, their caches back on their own buffers
    assert mirror.rows == 1 and a.lent is None and b.lent is None and (b.kv[0][0][0, :, :40] == 2).all()
    mirror.sync(0, a, 1)
    mirror.move(0, 2, 1)  # a move past the rows grows them
    assert mirror.rows == 3 and is_row(a, 2)
    mirror.release()  # every lent cache back on its own buffers
    assert a.lent is None and mirror.owners == [None] * 3


def test_a_lent_cache_takes_back_every_slot_its_row_holds():
    """take_back copies the row's slots into the cache's own buffers: every slot below `upto` (or
    every slot of the row), each with its own value, the last one included; a slot lost there is
    a global-cache entry the sequence later attends to as zeros (wrong bytes, no error)."""
    import torch

    from fastblt.model.config import StackConfig
    from fastblt.runtime.caches import LinearCache, MirrorRows

    cfg = StackConfig(dim=8, n_layers=2, n_heads=2, ffn_dim=8, max_positions=256)
    mirror = MirrorRows(cfg, 2, torch.float32, torch.device("cpu"))
    assert mirror.reserve(64, 2)
    for upto in (37, None):
        cache = LinearCache(cfg, torch.float32, torch.device("cpu"))
        mirror.sync(1, cache, 0)
        assert cache.lent == (mirror, 1)
        written = []
        for k, v in cache.kv:  # a step writing the row: a distinct value in every slot
            for t, sign in ((k, 1.0), (v, -1.0)):
                t.copy_(sign * (1 + torch.arange(t.numel(), dtype=t.dtype)).view(t.shape))
                written.append(t.clone())
        n = mirror.cap if upto is None else upto
        cache.take_back(upto)
        assert cache.lent is None and mirror.owners[1] is None and cache.slots >= n
        got = [t for pair in cache.kv for t in pair]
        for mine, want in zip(got, written, strict=True):
            assert torch.equal(mine[:, :, :n], want[:, :, :n])


def test_a_global_step_in_parts_is_not_overwritten_by_padding_between_them():
    """A global step of more than max_step patches runs in parts, and g_len counts them only after
    the last: between two parts the sequence may be a padding row of another batched global call,
    which must write past the first part's slots (`free_slot`), or the second part reads clobbered
    ones (found by 1,000 batched requests: 3 sampled blt-dv rows differed)."""
    import torch

    from fastblt.runtime.caches import RowCaches
    from fastblt.runtime.calls import StepRunner
    from fastblt.runtime.state import SequenceState

    g = torch_generator("small-window")
    backend, config = g.engine.backend, g.config
    rows = RowCaches(backend.specs, config, 3, torch.float32, backend.device)
    states = [SequenceState(backend, config, rows=rows, row=i) for i in range(3)]
    alone = SequenceState(backend, config)
    n = 4 * 40
    h = torch.randn(n, config.encoder.dim, generator=torch.Generator().manual_seed(2))
    for st in (*states, alone):
        st._room(n)
        st.h[:n] = h.to(st.dtype)
    spans = [(4 * i, 4 * i + 4) for i in range(40)]  # 40 patches: parts of 32 and 8
    runner = StepRunner(backend, 3)
    plan = states[1].run_global(spans, 0)
    first = next(plan)
    runner.run([first], states)
    second = plan.send(first.outputs)
    assert states[1].free_slot() == 40  # the parts' end, though g_len is still 0
    others = [next(states[i].run_global([(0, 4)], 0)) for i in (0, 2)]  # row 1 pads this call
    runner.run(others, states)
    runner.run([second], states)
    alone.run(alone.run_global(spans, 0))
    got_kv, want_kv = states[1].linear["global"].kv, alone.linear["global"].kv
    for (k, v), (k1, v1) in zip(got_kv, want_kv, strict=True):  # what the second part wrote
        assert torch.allclose(k[:, :, 32:40], k1[:, :, 32:40], atol=1e-5)
        assert torch.allclose(v[:, :, 32:40], v1[:, :, 32:40], atol=1e-5)
    for (k, v), (k1, v1) in zip(rows.cross_rows(1, 2), alone.rows.cross_rows(0, 1), strict=True):
        assert torch.allclose(k[:, :, 32:40], k1[:, :, 32:40], atol=1e-5)
        assert torch.allclose(v[:, :, 32:40], v1[:, :, 32:40], atol=1e-5)
