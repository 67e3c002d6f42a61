"""Option logprobs: every generated id's log-probability is the full model's, at its position, in
every causal mode (ar, blt-s, blt-dv), greedy or sampled, alone or in a batch."""

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
    full = full_log_probs(model, prompt, out.ids)
    assert len(out.logprobs) == len(out.top_logprobs) == len(out.ids) > 0
    for j, (t, lp, best) in enumerate(zip(out.ids, out.logprobs, out.top_logprobs, strict=True)):
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
