"""Options logprobs and prompt_logprobs: every generated id's log-probability is the full model's,
at its position, in every causal mode (ar, blt-s, blt-dv), greedy or sampled, alone or in a
batch; every prompt id's likewise, in every mode, whatever the prefill's chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from runtime_refs import PROMPTS, tiny_model, torch_generator

from fastblt.errors import InputError
from fastblt.model.tokenizer import encode
from fastblt.runtime.batch import BatchEngine
from fastblt.runtime.options import make_request

TOL = 1e-4  # fp32 step graphs against one full forward: rounding, not a different distribution


def full_log_probs(model, prompt, ids: list[int]) -> np.ndarray:
    """log-softmax of the whole model over prompt + output: row j scores output id j."""
    tokens = encode(prompt) + ids
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0].double()
    start = len(tokens) - len(ids) - 1
    return torch.log_softmax(logits, -1)[start : start + len(ids)].numpy()


def check_against_full(model, prompt, out, top: int) -> None:
    check_scores(full_log_probs(model, prompt, out.ids), out.ids, out.logprobs, out.top_logprobs, top)


def check_scores(full: np.ndarray, ids: list[int], logprobs: list[float], tops: list[dict], top: int) -> None:
    assert len(logprobs) == len(tops) == len(ids) > 0
    for j, (t, lp, best) in enumerate(zip(ids, logprobs, tops, strict=True)):
        assert abs(lp - full[j, t]) < TOL, (j, lp, full[j, t])
        assert len(best) == top and list(best.values()) == sorted(best.values(), reverse=True)
        assert all(abs(v - full[j, i]) < TOL for i, v in best.items())
        rest = np.delete(full[j], list(best))
        assert not best or min(best.values()) >= rest.max() - TOL  # the most likely ids, not any ids


@pytest.mark.parametrize("mode", ["ar", "blt-s", "blt-dv"])
@pytest.mark.parametrize("sampled", [False, True])
def test_logprobs_are_the_full_models(mode, sampled):
    g, model = torch_generator(), tiny_model()
    opts = {"temperature": 0.9, "top_k": 12, "seed": 5} if sampled else {}
    for prompt, top in ((PROMPTS[0], 3), (PROMPTS[3], 0)):
        out = g.generate(prompt, mode=mode, max_bytes=30, stop_on_eos=False, logprobs=top, **opts)
        check_against_full(model, prompt, out, top)


def test_logprobs_follow_the_ids_through_stops_and_eos():
    g, model = torch_generator(), tiny_model()
    full = g.generate(PROMPTS[1], mode="blt-s", max_bytes=40, stop_on_eos=False, logprobs=1)
    stop = bytes(full.bytes[10:12])
    out = g.generate(PROMPTS[1], mode="blt-s", max_bytes=40, stop_on_eos=False, stop=[stop], logprobs=1)
    assert out.stop_reason == "stop" and len(out.logprobs) == len(out.ids)  # the stop string's ids included
    check_against_full(model, PROMPTS[1], out, 1)
    plain = g.generate(PROMPTS[1], mode="ar", max_bytes=40, stop_on_eos=False)
    assert plain.logprobs is None and plain.top_logprobs is None


@pytest.mark.parametrize("options", [dict(mode="blt-d", logprobs=1), dict(mode="ar", logprobs=21),
                                     dict(mode="ar", logprobs=-1), dict(mode="ar", logprobs=True)])  # fmt: skip
def test_bad_logprobs_are_refused(options):
    with pytest.raises(InputError, match="option logprobs"):
        make_request("x", tiny_model().config, **options)


def test_batched_logprobs_are_each_requests_own():
    g, model = torch_generator(), tiny_model()
    work = [(p, m) for p in PROMPTS[:4] for m in ("ar", "blt-s", "blt-dv")]
    with BatchEngine(g.engine, 6, 64, backend_name=g.backend_name, params=g.params) as batch:
        tickets = [batch.submit(make_request(p, g.config, m, 24, stop_on_eos=False, logprobs=2)) for p, m in work]
        outs = [t.result(120) for t in tickets]
    for (prompt, _), out in zip(work, outs, strict=True):
        check_against_full(model, prompt, out, 2)


@pytest.mark.parametrize("mode", ["ar", "blt-s", "blt-d", "blt-dv"])
def test_prompt_logprobs_are_the_full_models_whatever_the_chunks(mode):
    g, model = torch_generator(), tiny_model()
    # patches close inside and across prefill chunks; the long prompt closes more patches than one
    # global step takes, so its prefill decodes in several groups
    for prompt in (PROMPTS[3] * 3, PROMPTS[3] * 10):
        ids = encode(prompt)
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)[:-1].numpy()
        for chunk in (None, 5):
            out = g.generate(prompt, mode=mode, max_bytes=3, prompt_logprobs=2, prefill_chunk=chunk)
            check_scores(full, ids[1:], out.prompt_logprobs, out.prompt_top_logprobs, 2)
            assert out.logprobs is None
    with pytest.raises(InputError, match="option prompt_logprobs"):
        make_request("x", g.config, mode, prompt_logprobs=21)


def test_batched_prompt_logprobs_are_each_requests_own():
    g, model = torch_generator(), tiny_model()
    with BatchEngine(g.engine, 4, 16, backend_name=g.backend_name, params=g.params) as batch:
        tickets = [batch.submit(make_request(p, g.config, "blt-d", 4, prompt_logprobs=0)) for p in PROMPTS]
        outs = [t.result(120) for t in tickets]
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = encode(prompt)  # "x": BOS and one byte, one score
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)[:-1].numpy()
        check_scores(full, ids[1:], out.prompt_logprobs, out.prompt_top_logprobs, 0)


def test_streamed_chunks_carry_their_scores():
    """An AsyncEngine stream with logprobs: each chunk's scores are its bytes' (and the ids between
    them), in order, so together they are the Generation's, up to the text's end (a stop string's
    ids, cut from the text, are not streamed)."""
    import asyncio

    from fastblt.runtime.async_engine import AsyncEngine

    eng = AsyncEngine(tiny_model(), backend="torch", max_batch=4, lanes=1, processes=False)
    try:
        full = eng.generator.generate(PROMPTS[1], mode="blt-s", max_bytes=40, stop_on_eos=False, logprobs=2)
        stop = bytes(full.bytes[20:22])

        async def main(late: bool):
            stream = eng.stream(PROMPTS[1], mode="blt-s", max_bytes=40, stop_on_eos=False, logprobs=2, stop=[stop])
            if late:  # every chunk arrived before the first read: they are read as one
                await asyncio.to_thread(stream.ticket.result, 60)
            parts = []
            async for _ in stream:
                assert stream.chunk_scores is not None  # every chunk has its scores
                parts.append(stream.chunk_scores)
            return parts, stream.generation

        for late in (False, True):
            parts, gen = asyncio.run(main(late))
            assert late or len(parts) > 1  # really streamed in several chunks
            assert gen.stop_reason == "stop"
            ids = [i for p in parts for i in p[0]]
            assert ids == gen.ids[: len(ids)] and bytes(i - 4 for i in ids if i >= 4) == gen.bytes
            assert [v for p in parts for v in p[1]] == gen.logprobs[: len(ids)]
            assert [t for p in parts for t in p[2]] == gen.top_logprobs[: len(ids)]
    finally:
        eng.close(30)


def test_a_streams_first_chunk_leads_with_the_prompts_scores():
    """logprobs and prompt_logprobs streamed: the first chunk's scores begin with the prompt's (an
    entry per prompt id after BOS), the rest are the chunks' own, as the Generation has them."""
    import asyncio

    from fastblt.runtime.async_engine import AsyncEngine

    eng = AsyncEngine(tiny_model(), backend="torch", max_batch=4, lanes=1, processes=False)
    try:

        async def main():
            stream = eng.stream(PROMPTS[1], mode="ar", max_bytes=24, stop_on_eos=False, logprobs=1, prompt_logprobs=1)
            return [stream.chunk_scores async for _ in stream], stream.generation

        parts, gen = asyncio.run(main())
        n = len(encode(PROMPTS[1])) - 1
        ids = [i for p in parts for i in p[0]]
        assert ids == encode(PROMPTS[1])[1:] + gen.ids
        assert [v for p in parts for v in p[1]] == gen.prompt_logprobs + gen.logprobs
        assert [t for p in parts for t in p[2]] == gen.prompt_top_logprobs + gen.top_logprobs
        assert len(parts[0][0]) > n  # the prompt's entries and the first chunk's own
    finally:
        eng.close(30)


def test_a_chunks_prompt_scores_rank_ties_by_id_and_skip_the_row_past_the_prompt():
    """A prefill chunk's rows are scored at once: each id under its own row, top ids most likely
    first with ties broken by the lower id, and a row with no prompt id after it (the last one,
    which predicts the output) not scored."""
    from fastblt.runtime.stream import Output

    out = Output(8, prompt_top_logprobs=3)
    rows = np.zeros((3, 260), dtype=np.float32)
    rows[1, 200] = rows[1, 7] = 5.0  # a tie between 7 and 200 above the rest
    out.score_prompt([9, 200], rows)
    assert len(out.prompt_logprobs) == 2
    assert out.prompt_logprobs[0] == pytest.approx(-np.log(260.0), rel=1e-12)  # every logit equal: each id 1/260
    assert list(out.prompt_top_logprobs[0]) == [0, 1, 2] and list(out.prompt_top_logprobs[1]) == [7, 200, 0]
    assert out.prompt_logprobs[1] == out.prompt_top_logprobs[1][200] == out.prompt_top_logprobs[1][7]
