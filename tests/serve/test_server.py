"""`fastblt serve` as a user runs it, called with the real openai client: completions equal
Generator.generate for the same settings, in every mode, streamed or not, alone or 64 at once."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import signal
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from conftest import KEY

from fastblt.runtime.async_engine import cpu_cores, default_lanes
from fastblt.serve.api import logprobs_body
from fastblt.serve.app import fingerprint
from fastblt.serve.process import ServerProcess

from tiny import run_cli

MODEL = "fastblt-default"
PROMPT = "import os\n\n\ndef main("
MODES = ("ar", "blt-s", "blt-d", "blt-dv")


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.mark.parametrize("mode", MODES)
def test_completions_equal_generate_in_every_mode(server, reference, mode):
    c = client(server)
    want = reference.generate(PROMPT, mode=mode, max_bytes=48, temperature=0.0)
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=48, temperature=0, extra_body={"mode": mode})
    choice = r.choices[0]
    assert choice.text == want.text
    assert choice.finish_reason == ("length" if want.stop_reason == "max_bytes" else "stop")
    assert r.usage.prompt_tokens == len(PROMPT.encode()) and r.usage.completion_tokens == len(want.ids)
    assert r.model == MODEL and r.object == "text_completion"
    assert r.system_fingerprint == fingerprint(SimpleNamespace(generator=reference))  # the same weights, on ort

    chunks = list(c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=48, temperature=0, stream=True,
                                       extra_body={"mode": mode}))  # fmt: skip
    assert "".join(ch.choices[0].text for ch in chunks) == want.text
    assert {ch.system_fingerprint for ch in chunks} == {r.system_fingerprint}
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])


def test_the_fingerprint_follows_weights_and_backend(reference):
    import copy

    import torch

    fp = fingerprint(SimpleNamespace(generator=reference))
    assert re.fullmatch(r"fp_[0-9a-f]{16}", fp)
    torch_backend = SimpleNamespace(generator=SimpleNamespace(**{**vars(reference), "backend_name": "torch"}))
    assert fingerprint(torch_backend) != fp
    model = copy.deepcopy(reference.model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0
    other = SimpleNamespace(generator=SimpleNamespace(model=model, checkpoint_path=None, backend_name="ort"))
    same = SimpleNamespace(generator=SimpleNamespace(model=reference.model, checkpoint_path=None, backend_name="ort"))
    assert fingerprint(other) != fingerprint(same)


def test_logprobs_are_the_engines_per_byte(server, reference):
    """OpenAI's logprobs object, a byte per token: the chosen byte's log-probability and the most
    likely ones' (the chosen one among them), offsets into the text; the stop string's bytes are
    not in the text, so not in the logprobs either."""
    c = client(server)
    prompt = "print('caf"
    want = reference.generate(prompt, mode="blt-s", max_bytes=24, temperature=0.0, logprobs=3)
    stop = want.bytes[12:14]
    cut = want.bytes.find(stop)
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, logprobs=3,
                             stop=[stop.decode()])  # fmt: skip
    lp, text = r.choices[0].logprobs, r.choices[0].text
    n = len(text.encode())
    assert text == want.bytes[:cut].decode() and n == cut == len(lp.tokens) == len(lp.token_logprobs)
    for j, (tok, value, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True)):
        b = want.bytes[j]
        assert tok == (chr(b) if b < 0x80 else f"bytes:\\x{b:02x}")
        assert abs(value - want.logprobs[j]) < 1e-4 and top[tok] == value
        assert len(top) in (3, 4) and max(top.values()) == top[tok]  # greedy: the chosen byte is the likeliest
    assert lp.text_offset == [len(text.encode()[:j].decode("utf-8", "ignore")) for j in range(n)]
    plain = c.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None

    # streamed (n 2, sampled): each choice's chunks carry their bytes' entries, offsets running on
    # across chunks; together they are the choice's logprobs as a non-streamed answer has them
    opts = dict(model=MODEL, prompt=prompt, max_tokens=32, temperature=0.9, seed=3, n=2, logprobs=2,
                extra_body={"mode": "ar"})  # fmt: skip
    whole = c.completions.create(**opts)
    parts: dict[int, dict] = {0: {}, 1: {}}
    chunks = 0
    for chunk in c.completions.create(stream=True, **opts):
        for ch in chunk.choices:
            if ch.text:
                chunks += 1
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    parts[ch.index].setdefault(key, []).extend(getattr(ch.logprobs, key))
    assert chunks > 2
    for i, ch in enumerate(whole.choices):
        assert parts[i] == {key: getattr(ch.logprobs, key) for key in parts[i]} and len(parts[i]["tokens"]) > 0


def test_echo_scores_the_prompt_as_evaluation_harnesses_ask(server, reference):
    """echo + logprobs + max_tokens 0: the prompt's log-likelihood, byte by byte, and nothing
    generated; with max_tokens > 0, the prompt's entries then the completion's."""
    c = client(server)
    prompt = "def add(a, b):\n    return a + b\n"
    want = reference.generate(prompt, mode="blt-s", max_bytes=8, temperature=0.0, logprobs=1, prompt_logprobs=1)
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp, n = r.choices[0].logprobs, len(prompt)
    assert r.choices[0].text == prompt and r.usage.completion_tokens == 0 and r.choices[0].finish_reason == "length"
    assert lp.tokens == list(prompt) and lp.text_offset == list(range(n))
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs, want.prompt_logprobs, strict=True)) < 1e-4
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt + want.text and r.usage.completion_tokens == 8
    assert len(lp.tokens) == n + 8 and lp.text_offset[n] == n
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs, want.prompt_logprobs + want.logprobs, strict=True)) < 1e-4
    chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, echo=True, temperature=0,
                                       stream=True))  # fmt: skip
    assert chunks[0].choices[0].text == prompt and "".join(ch.choices[0].text for ch in chunks) == prompt + want.text

    # streamed with logprobs: the first chunk (the prompt) carries the prompt's entries, the rest
    # the completion's; together they are the non-streamed object (n 2 greedy: one generation; a
    # stop string at the first byte: no chunk but the prompt's)
    for max_tokens, stop in ((8, None), (1, None), (8, want.text[:1])):
        opts = dict(model=MODEL, prompt=prompt, max_tokens=max_tokens, echo=True, logprobs=2, temperature=0, n=2,
                    stop=stop)  # fmt: skip
        whole = c.completions.create(**opts).choices[0].logprobs
        assert len(whole.tokens) == n + (max_tokens if stop is None else 0)
        chunks = list(c.completions.create(stream=True, **opts))
        first = chunks[0].choices[0]
        assert first.text == prompt and first.logprobs.tokens == list(prompt)
        assert first.logprobs.token_logprobs == whole.token_logprobs[:n]
        for i in (0, 1):
            parts = [ch.logprobs for chunk in chunks for ch in chunk.choices if ch.index == i and ch.text]
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                assert [x for part in parts for x in getattr(part, key)] == getattr(whole, key), (max_tokens, key)


def test_n_choices_of_a_long_prompt_prefill_it_once_per_lane(server, reference):
    """n sampled choices of a long prompt: a lane's first choice prefills it, the others there
    take a copy of that prefill, and every choice is still its own seeded request's bytes."""
    import textwrap

    prompt = Path(textwrap.__file__).read_text()[:1500]
    n, lanes = 8, int(_metric(server, "fastblt_batch_lanes"))
    before = _metric(server, "fastblt_shared_prefills_total")
    r = client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=6, n=n, temperature=0.9, seed=5,
                                          extra_body={"mode": "ar"})  # fmt: skip
    shared = _metric(server, "fastblt_shared_prefills_total") - before
    assert n - lanes <= shared <= n - 1
    want = [reference.generate(prompt, mode="ar", max_bytes=6, temperature=0.9, seed=5 + i).text for i in range(n)]
    assert [ch.text for ch in r.choices] == want


def test_a_prompt_sent_again_loads_its_snapshot(server, reference):
    """The same long prompt again, one request after another: the later ones load the snapshot the
    first one's lane kept (the router sends them back there), answer the same bytes and count the
    bytes loaded as cached in their usage."""
    import difflib

    prompt = Path(difflib.__file__).read_text()[2000:3000]
    hits = _metric(server, "fastblt_prompt_cache_hits_total")
    ids = _metric(server, "fastblt_prompt_cache_hit_ids_total")
    opts = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, extra_body={"mode": "blt-s"})
    first, again = (client(server).completions.create(**opts) for _ in range(2))
    assert [r.choices[0].text for r in (first, again)] == [
        reference.generate(prompt, mode="blt-s", max_bytes=16).text
    ] * 2
    # OpenAI's usage names the prompt tokens served from a cache: bytes below the cut, BOS not counted
    assert [r.usage.prompt_tokens_details.cached_tokens for r in (first, again)] == [0, 991]
    stream = client(server).completions.create(stream=True, stream_options={"include_usage": True}, **opts)
    assert list(stream)[-1].usage.prompt_tokens_details.cached_tokens == 991
    assert _metric(server, "fastblt_prompt_cache_hits_total") == hits + 2
    assert _metric(server, "fastblt_prompt_cache_hit_ids_total") >= ids + 960
    assert _metric(server, "fastblt_prompt_cache_bytes") > 0


def test_lanes_load_each_others_prompt_snapshots(server, reference):
    """A prompt's sampled choices spread over the lanes (n 4): those on a lane other than the one
    that kept its snapshot load that lane's file, with the bytes of their seeded requests alone."""
    import difflib

    if len(server.workers()) < 2:
        pytest.skip("one lane (a 1-core machine): nothing to share")
    prompt = Path(difflib.__file__).read_text()[6000:7000]
    opts = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0.9, seed=5, extra_body={"mode": "ar"})
    hits, shared = (_metric(server, f"fastblt_prompt_cache_{m}_total") for m in ("hits", "shared_hits"))
    client(server).completions.create(**opts)  # one lane commits it and keeps its snapshot
    r = client(server).completions.create(n=4, **opts)
    want = [reference.generate(prompt, mode="ar", max_bytes=12, temperature=0.9, seed=5 + i).text for i in range(4)]
    assert [ch.text for ch in r.choices] == want
    assert _metric(server, "fastblt_prompt_cache_shared_hits_total") >= shared + 1
    assert _metric(server, "fastblt_prompt_cache_hits_total") >= hits + 2  # a lane's others may copy its prefill


def test_scoring_requests_of_one_context_load_its_scored_snapshot(server, reference):
    """Evaluation harnesses score a context with each of several continuations (echo + logprobs +
    max_tokens 0): the later ones load the context's snapshot with its scores, count those bytes
    as cached, and score every byte as the first request and a Generator alone do."""
    import difflib

    context = Path(difflib.__file__).read_text()[5000:5700]
    opts = dict(model=MODEL, max_tokens=0, echo=True, logprobs=2, temperature=0)
    prompts = [context + "a = 1\n", context + "bb = 2\n", context + "a = 1\n"]  # 707 and 708 ids: cut at 704
    rs = [client(server).completions.create(prompt=p, **opts) for p in prompts]
    # the second shares the context's ids below 512 (its stride point), the third the first's below 704
    assert [r.usage.prompt_tokens_details.cached_tokens for r in rs] == [0, 511, 703]
    assert rs[2].choices[0].logprobs == rs[0].choices[0].logprobs  # loaded, to the bit
    want = reference.generate(prompts[1], mode="ar", max_bytes=1, prompt_logprobs=2).prompt_logprobs
    assert max(abs(a - b) for a, b in zip(rs[1].choices[0].logprobs.token_logprobs, want, strict=True)) < 1e-4


def test_n_choices_are_each_their_own_seeded_request(server, reference):
    """n sampled choices: choice i is the request with seed + i, streamed or not, each with its
    index and finish reason; usage counts every choice. Greedy choices are one generation's."""
    c = client(server)
    opts = dict(temperature=0.9, seed=41)
    want = [reference.generate(PROMPT, mode="ar", max_bytes=24, temperature=0.9, seed=41 + i) for i in range(3)]
    assert len({w.text for w in want}) > 1  # the seeds make different choices
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, n=3, extra_body={"mode": "ar"}, **opts)
    assert [ch.index for ch in r.choices] == [0, 1, 2] and [ch.text for ch in r.choices] == [w.text for w in want]
    assert r.usage.completion_tokens == sum(len(w.ids) for w in want)

    more = dict(stream=True, stream_options={"include_usage": True}, extra_body={"mode": "ar"})
    stream = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, n=3, **more, **opts)
    *chunks, last = list(stream)
    texts, reasons = ["", "", ""], [None, None, None]
    for ch in chunks:
        for part in ch.choices:
            assert reasons[part.index] is None  # nothing after a choice's end
            texts[part.index] += part.text
            reasons[part.index] = part.finish_reason
    assert texts == [w.text for w in want] and reasons == ["length"] * 3
    assert last.usage.completion_tokens == r.usage.completion_tokens

    greedy = reference.generate(PROMPT, mode="blt-s", max_bytes=16, temperature=0.0).text
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, n=2, temperature=0)
    assert [ch.text for ch in r.choices] == [greedy, greedy] and r.usage.completion_tokens == 32
    *_, last = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, n=2, temperature=0, stream=True,
                                    stream_options={"include_usage": True})  # fmt: skip
    assert last.usage.completion_tokens == 32  # both choices, though one generation streamed them


def test_best_of_sends_the_candidates_with_the_highest_mean_logprob(server, reference):
    """best_of > n: candidate i is the request with seed + i; the n with the highest mean
    log-probability per byte are the choices, best first; usage counts every candidate; logprobs
    only when asked. In a verified mode the candidates are its own sampled requests."""
    c = client(server)
    for mode in ("ar", "blt-s"):
        cands = [reference.generate(PROMPT, mode=mode, max_bytes=24, temperature=0.9, seed=31 + i, logprobs=0)
                 for i in range(4)]  # fmt: skip
        best = sorted(cands, key=lambda w: -sum(w.logprobs) / len(w.logprobs))
        assert best[:2] != cands[:2]  # the ranking picks other candidates than the first two seeds
        r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, n=2, best_of=4, temperature=0.9, seed=31,
                                 extra_body={"mode": mode})  # fmt: skip
        assert [ch.text for ch in r.choices] == [w.text for w in best[:2]] and [ch.index for ch in r.choices] == [0, 1]
        assert r.usage.completion_tokens == sum(len(w.ids) for w in cands)
        assert all(ch.logprobs is None for ch in r.choices)
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, best_of=4, temperature=0.9, seed=31, logprobs=1,
                             extra_body={"mode": "blt-s"})  # fmt: skip
    assert r.choices[0].text == best[0].text and r.choices[0].logprobs.token_logprobs == best[0].logprobs
    prompts = [PROMPT, "class Parser:\n    def "]  # each prompt's candidates are ranked among themselves
    want = []
    for p in prompts:
        cands = [reference.generate(p, mode="ar", max_bytes=16, temperature=0.9, seed=31 + i, logprobs=0)
                 for i in range(3)]  # fmt: skip
        want.append(max(cands, key=lambda w: sum(w.logprobs) / len(w.logprobs)).text)
    r = c.completions.create(model=MODEL, prompt=prompts, max_tokens=16, best_of=3, temperature=0.9, seed=31,
                             extra_body={"mode": "ar"})  # fmt: skip
    assert [ch.index for ch in r.choices] == [0, 1] and [ch.text for ch in r.choices] == want


def test_choices_become_as_many_requests_as_they_need_and_no_more_than_fit(reference):
    """Sampled choices are a request each; greedy ones, and scoring (max_tokens 0, whose byte is
    dropped), one per prompt. More requests than the server can ever hold is a 400 naming n (a 429
    would fail on every retry); a scoring request may fill --max-context with its prompt alone."""
    from fastblt.serve.api import Completion
    from fastblt.serve.app import SERVE_EXTRA_IDS, ApiError, _jobs

    eng = SimpleNamespace(request=reference.request, capacity=20,
                          generator=SimpleNamespace(max_context=10 + SERVE_EXTRA_IDS))  # fmt: skip

    def jobs(max_tokens: int, n: int, temperature: float, prompts=("abc", "de")) -> list:
        options = {"mode": "ar", "temperature": temperature}
        return _jobs(eng, Completion(list(prompts), max_tokens, False, False, options, echo=True, n=n))

    assert [j.indices for j in jobs(4, 3, 1.0)] == [[0], [1], [2], [3], [4], [5]]
    seeded = _jobs(eng, Completion(["abc"], 4, False, False, {"mode": "ar", "temperature": 1.0, "seed": 2**63 - 1},
                                   n=3))  # fmt: skip
    assert [j.req.opts.seed for j in seeded] == [2**63 - 1, 0, 1]  # seed + i, mod 2^63 (the seeds there are)
    assert [j.req.opts.seed for j in jobs(4, 3, 1.0)] == [None] * 6  # no seed given: each its own
    assert [j.indices for j in jobs(4, 3, 0.0)] == [[0, 1, 2], [3, 4, 5]]
    assert [j.indices for j in jobs(0, 16, 1.0)] == [list(range(16)), list(range(16, 32))]
    with pytest.raises(ApiError) as e:
        jobs(4, 16, 1.0)  # 32 requests, 20 places
    assert e.value.status == 400 and e.value.param == "n" and "at most 20" in e.value.message
    assert len(jobs(0, 1, 1.0, prompts=["x" * 10])) == 1  # the prompt alone fills the limit
    with pytest.raises(ApiError) as e:
        jobs(1, 1, 1.0, prompts=["y", "x" * 10])
    assert e.value.code == "context_length_exceeded" and e.value.message.startswith("prompt[1] + max_tokens")


def test_together_cancels_the_rest_when_one_fails():
    """One choice that cannot run (its lane refused it) frees the others' rows: they are cancelled,
    not left decoding for an answer nobody will send."""
    from fastblt.serve.app import _together

    async def main() -> bool:
        gate = asyncio.Event()

        async def fails() -> None:
            raise RuntimeError("refused")

        async def waits() -> None:
            await gate.wait()

        other = asyncio.ensure_future(waits())
        with pytest.raises(RuntimeError):
            await _together([fails(), other])
        return other.cancelled()

    assert asyncio.run(main())


def test_a_scoring_request_of_a_full_context_fits_the_engine(reference):
    """The server's engine holds --max-context bytes plus BOS plus the byte a scoring request
    decodes and drops: a prompt of exactly --max-context bytes with max_tokens 0 fits it."""
    from fastblt.runtime.options import check_fit
    from fastblt.serve.app import SERVE_EXTRA_IDS

    limit = 50
    req = reference.request("x" * limit, mode="ar", max_bytes=1)  # what _request makes of max_tokens 0
    check_fit(req, reference.engine.max_step, limit + SERVE_EXTRA_IDS)


def test_scoring_a_text_works_in_every_mode(server, reference):
    """The prompt's scores come from the prefill's causal pass, so scoring works in blt-d too
    (whose own bytes have no causal scores)."""
    prompt = "for i in range(10):\n"
    want = reference.generate(prompt, mode="ar", max_bytes=1, prompt_logprobs=0).prompt_logprobs
    for mode in ("blt-d", "blt-s"):
        r = client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=0,
                                              extra_body={"mode": mode})  # fmt: skip
        got = r.choices[0].logprobs.token_logprobs
        assert len(got) == len(prompt) and max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4, mode


def test_logprobs_name_bytes_that_are_not_whole_characters():
    data = "aé€".encode() + b"\xff" + b"z"
    ids = [1, *(b + 4 for b in data), ord("S") + 4, ord("T") + 4]  # a special id, the text, a stop string
    lps = [-0.5 - j for j in range(len(ids))]
    tops = [{5: -9.0} for _ in ids]
    o = logprobs_body(ids, data, lps, tops)
    assert o["tokens"] == ["<bos>", "a", "bytes:\\xc3", "bytes:\\xa9", "bytes:\\xe2", "bytes:\\x82",
                           "bytes:\\xac", "bytes:\\xff", "z"]  # fmt: skip
    assert o["text_offset"] == [0, 0, 1, 1, 2, 2, 2, 3, 4]  # "aé€\ufffdz": a byte's character's offset
    assert o["token_logprobs"] == lps[:9] and o["top_logprobs"][1] == {"\x01": -9.0, "a": -1.5}
    # a lead byte the next byte shows invalid is its own U+FFFD, and the next byte is after it
    for data, offsets in ((b"a\xf2b", [0, 1, 2]), (b"\xe2\xc3\xa9z", [0, 1, 1, 2]), (b"\xf0\x9f", [0, 0])):
        ids = [b + 4 for b in data]
        o = logprobs_body(ids, data, [0.0] * len(ids), [{}] * len(ids))
        text = data.decode("utf-8", "replace")
        assert o["text_offset"] == offsets and max(offsets) < len(text), (data, text)


def test_stop_strings_seeds_and_fastblt_fields(server, reference):
    c = client(server)
    full = reference.generate(PROMPT, mode="blt-s", max_bytes=80, temperature=0.0).text
    stops = [full[30:34], "\x00never"]  # one that occurs in the output
    want = reference.generate(PROMPT, mode="blt-s", max_bytes=80, stop=stops, temperature=0.0)
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=80, temperature=0, stop=stops)
    assert r.choices[0].text == want.text == full[: full.find(stops[0])]
    assert r.choices[0].finish_reason == "stop"

    opts = dict(temperature=0.8, top_p=0.9, seed=1234)
    want = reference.generate(PROMPT, mode="ar", max_bytes=40, **opts)
    got = [c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, extra_body={"mode": "ar"}, **opts)
           for _ in range(2)]  # fmt: skip
    assert got[0].choices[0].text == got[1].choices[0].text == want.text

    want = reference.generate(PROMPT, mode="blt-dv", max_bytes=40, k=4, top_k=5, temperature=0.7, seed=9)
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0.7, seed=9,
                             extra_body={"mode": "blt-dv", "k": 4, "top_k": 5})  # fmt: skip
    assert r.choices[0].text == want.text

    stream = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                  stream_options={"include_usage": True})  # fmt: skip
    *chunks, last = list(stream)
    assert last.usage.completion_tokens == 20 and last.choices == []
    assert all("usage" in ch.model_fields_set and ch.usage is None for ch in chunks)  # null, as OpenAI sends it


def test_logit_bias_and_penalties_steer_as_the_generator_does(server, reference):
    """OpenAI's logit_bias (a byte per token) and presence / frequency penalties: the openai client
    sends them as they are; the answer equals the Generator's with the same settings (streamed
    too, sampled too, penalties alone), and a banned byte is absent."""
    c = client(server)
    plain = reference.generate(PROMPT, mode="ar", max_bytes=40, temperature=0.0).bytes
    banned = sorted(set(plain[:4]))
    bias = {b: -100 for b in banned}
    for mode, opts, penalties in [("blt-s", {"temperature": 0.0}, {}),
                                  ("ar", {"temperature": 0.9, "seed": 5}, {"frequency_penalty": 0.8}),
                                  ("blt-dv", {"temperature": 0.0}, {"presence_penalty": 1.2})]:  # fmt: skip
        want = reference.generate(PROMPT, mode=mode, max_bytes=40, logit_bias=bias, **opts, **penalties)
        assert not set(want.bytes) & set(banned) and want.bytes != plain
        kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=40, logit_bias={str(b): -100 for b in banned},
                      extra_body={"mode": mode}, **opts, **penalties)  # fmt: skip
        assert c.completions.create(**kwargs).choices[0].text == want.text
        assert "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **kwargs)) == want.text
    want = reference.generate(PROMPT, mode="blt-s", max_bytes=40, temperature=0.0, frequency_penalty=1.0)
    assert want.bytes != plain
    r = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, frequency_penalty=1.0)
    assert r.choices[0].text == want.text


def test_four_stop_strings_are_allowed(server, reference):
    """OpenAI allows up to 4 stop sequences: a client sending 4 must not be refused."""
    full = reference.generate(PROMPT, mode="blt-s", max_bytes=60, temperature=0.0).text
    stops = [full[30:34], "\x00a", "\x00b", "\x00c"]
    want = reference.generate(PROMPT, mode="blt-s", max_bytes=60, stop=stops, temperature=0.0)
    r = client(server).completions.create(model=MODEL, prompt=PROMPT, max_tokens=60, temperature=0, stop=stops)
    assert r.choices[0].text == want.text == full[: full.find(stops[0])]


def test_temperature_defaults_to_one_as_openai(server, reference):
    """A request without temperature samples at 1.0 (OpenAI's default), not greedily: a seed
    gives the same text as Generator.generate at temperature 1.0."""
    want = reference.generate(PROMPT, mode="blt-s", max_bytes=40, temperature=1.0, seed=7)
    greedy = reference.generate(PROMPT, mode="blt-s", max_bytes=40, temperature=0.0)
    assert want.text != greedy.text  # the seed tells the two defaults apart
    r = client(server).completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, seed=7)
    assert r.choices[0].text == want.text


def test_sixty_four_concurrent_requests_equal_serial(server, reference):
    prompts = [f"def f{i}(x):\n    return x" for i in range(8)]
    jobs = [(prompts[i % 8], MODES[i % 4] if i % 4 != 2 else "blt-s") for i in range(64)]
    want = {(p, m): reference.generate(p, mode=m, max_bytes=24, temperature=0.0).text for p, m in set(jobs)}

    async def main():
        c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)
        rs = await asyncio.gather(*[c.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0,
                                                         extra_body={"mode": m}) for p, m in jobs])  # fmt: skip
        await c.close()
        return rs

    rows, calls = 'fastblt_step_rows_total{step="decoder"}', 'fastblt_step_calls_total{step="decoder"}'
    before = _metric(server, rows), _metric(server, calls)
    got = asyncio.run(main())
    assert [r.choices[0].text for r in got] == [want[j] for j in jobs]
    served, made = _metric(server, rows) - before[0], _metric(server, calls) - before[1]
    assert served > 2 * made  # they shared step calls


def test_models_health_metrics_and_keys(server):
    h = httpx.get(f"{server.url}/health")
    assert h.status_code == 200 and h.json() == {"status": "ok"} and h.headers["x-fastblt-replica"]
    assert httpx.head(f"{server.url}/health").status_code == 200
    m = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [d["id"] for d in m["data"]] == [MODEL]
    assert client(server).models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("gpt-4")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for given in (f"bearer {KEY}", f"BEARER {KEY}", f"Bearer  {KEY}"):  # the scheme is case-insensitive
        assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": given}).status_code == 200
    list(
        client(server).completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=4, stream=True, extra_body={"mode": "ar"}
        )
    )
    text = httpx.get(f"{server.url}/metrics").text  # the histograms have a request to show
    for name in ("fastblt_requests_total", "fastblt_generated_bytes_total", "fastblt_queue_depth",
                 "fastblt_batch_occupancy", "fastblt_time_to_first_byte_seconds_bucket",
                 "fastblt_inter_byte_latency_seconds_bucket", "fastblt_accepted_bytes_total",
                 "fastblt_preempted_total"):  # fmt: skip
        assert name in text, name
    assert _metric(server, 'fastblt_requests_total{endpoint="completions",mode="ar",status="200"}') >= 1
    assert _metric(server, "fastblt_batch_rows") == 16  # --max-batch, over every lane
    assert _metric(server, "fastblt_batch_lanes") == default_lanes("ort")
    assert _metric(server, "fastblt_batch_lanes_alive") == default_lanes("ort")
    assert _metric(server, "fastblt_lane_restarts_total") == 0


def test_schema_compilations_show_in_metrics(server):
    """A schema the server has not seen is compiled once (its seconds counted, its automata's
    states kept); the same schema again is not compiled again."""
    name = f"f{uuid.uuid4().hex}"  # no other request's schema
    schema = {"type": "object", "properties": {name: {"type": "integer", "minimum": 0, "maximum": 10**9,
                                                      "multipleOf": 7}}, "required": [name]}  # fmt: skip
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "mode": "ar",
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    compiles, seconds = (
        _metric(server, "fastblt_schema_compiles_total"),
        _metric(server, "fastblt_schema_compile_seconds_total"),
    )
    assert httpx.post(f"{server.url}/v1/completions", json=body, headers=headers).status_code == 200
    assert _metric(server, "fastblt_schema_compiles_total") == compiles + 1
    assert _metric(server, "fastblt_schema_compile_seconds_total") > seconds
    assert _metric(server, "fastblt_grammar_automata_states") > 0
    assert httpx.post(f"{server.url}/v1/completions", json=body, headers=headers).status_code == 200
    assert _metric(server, "fastblt_schema_compiles_total") == compiles + 1  # cached
    assert _metric(server, "fastblt_grammar_cache_clears_total") >= 0  # shown (other tests may have passed the budget)


def test_metrics_count_accepted_bytes_and_time_the_first_byte():
    """Per request: time to first byte is arrival to the first verified byte (not the last), and
    accepted bytes count the drafts that were accepted (not every one drafted)."""
    from fastblt.serve.metrics import Metrics

    m, arrived = Metrics(), 100.0
    stats = SimpleNamespace(mode="blt-s", generated=2, drafted=10, accepted=3)
    m.generation(SimpleNamespace(stats=stats, times=[arrived + 0.01, arrived + 5.0]), arrived)
    text = m.render().decode()

    def value(series: str) -> float:
        found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
        assert found is not None, f"{series} not in {text}"
        return float(found.group(1))

    assert value('fastblt_time_to_first_byte_seconds_sum{mode="blt-s"}') == pytest.approx(0.01)
    assert value('fastblt_time_to_first_byte_seconds_count{mode="blt-s"}') == 1
    assert value('fastblt_accepted_bytes_total{mode="blt-s"}') == 3
    assert value('fastblt_drafted_bytes_total{mode="blt-s"}') == 10
    assert value('fastblt_inter_byte_latency_seconds_sum{mode="blt-s"}') == pytest.approx(4.99)


def _metric(server, series: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert m is not None, f"{series} not in /metrics"
    return float(m.group(1))


def test_lanes_run_in_worker_processes_unless_asked_for_threads(server, reference):
    lanes = default_lanes("ort")
    assert len(server.workers()) == (lanes if lanes > 1 and cpu_cores() >= 2 else 0)
    assert len(server.group()) == 1 + len(server.workers()) + (len(server.workers()) > 0)  # + their zygote
    with ServerProcess(["--lane-threads", "--lanes", "2", "--max-batch", "2"]) as threads:
        assert threads.group()[1:] == []
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "mode": "ar"}
        got = httpx.post(f"{threads.url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        assert _metric(threads, "fastblt_batch_lanes") == 2
    assert got == reference.generate(PROMPT, mode="ar", max_bytes=16, temperature=0.0).text


def test_a_server_whose_lane_processes_all_died_says_so_and_starts_them_again(reference):
    with ServerProcess(["--lanes", "2", "--lane-processes", "--max-batch", "2"]) as srv:
        workers = srv.workers()
        assert len(workers) == 2
        long = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4000, "temperature": 0, "mode": "ar",
                "stop": []}  # fmt: skip
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a request in flight when its lane dies
            held = pool.submit(httpx.post, f"{srv.url}/v1/completions", json=long, timeout=120)
            while _metric(srv, "fastblt_batch_occupancy") < 1:
                time.sleep(0.02)
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            r = held.result()
        assert r.status_code == 503 and r.json()["error"]["code"] == "lane_lost", r.text  # send it again
        assert "exit code -9" in r.json()["error"]["message"] and int(r.headers["retry-after"]) >= 1
        for _ in range(200):
            if httpx.get(f"{srv.url}/health").status_code == 503:
                break
            time.sleep(0.05)
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and "no batch lane" in health.json()["error"]["message"]
        assert int(health.headers["retry-after"]) >= 1
        assert _metric(srv, "fastblt_batch_lanes_alive") == 0 and _metric(srv, "fastblt_batch_lanes") == 2
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "mode": "ar"}
        r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "lane_lost" and "retry-after" in r.headers
        for _ in range(600):  # both started again (after a pause: they died young)
            if _metric(srv, "fastblt_batch_lanes_alive") == 2:
                break
            time.sleep(0.1)
        assert _metric(srv, "fastblt_batch_lanes_alive") == 2 and httpx.get(f"{srv.url}/health").status_code == 200
        assert _metric(srv, "fastblt_lane_restarts_total") == 2
        assert len(srv.workers()) == 2 and not set(workers) & set(srv.workers())
        r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
        want = reference.generate(PROMPT, mode="ar", max_bytes=4, temperature=0.0).text
        assert r.json()["choices"][0]["text"] == want


# ---------------------------------------------------------------------------- CORS
PAGE = "https://app.example"


def preflight(url: str, origin: str) -> httpx.Response:
    """What a browser sends before a page's script may POST with a key."""
    headers = {"Origin": origin, "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}  # fmt: skip
    return httpx.options(f"{url}/v1/completions", headers=headers)


@pytest.mark.timeout(300)
def test_pages_of_an_allowed_origin_may_call_the_api_and_no_others(server):
    args = ["--max-batch", "2", "--api-key", KEY, "--allowed-origin", PAGE, "--allowed-origin", "http://[::1]:3000"]
    with ServerProcess(args) as srv:
        pre = preflight(srv.url, PAGE)  # answered before any key is asked for
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == PAGE
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert "x-stainless-os" in pre.headers["access-control-allow-headers"]
        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        r = httpx.post(f"{srv.url}/v1/completions", json=body,
                       headers={"Origin": PAGE, "Authorization": f"Bearer {KEY}"})  # fmt: skip
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == PAGE
        assert "x-request-id" in r.headers["access-control-expose-headers"]  # the page's script can read it
        assert preflight(srv.url, "http://[::1]:3000").status_code == 200
        other = preflight(srv.url, "https://elsewhere.example")
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        r = httpx.post(f"{srv.url}/v1/completions", json=body,
                       headers={"Origin": "https://elsewhere.example", "Authorization": f"Bearer {KEY}"})  # fmt: skip
        assert "access-control-allow-origin" not in r.headers  # the browser keeps the answer from that page
        r = httpx.post(f"{srv.url}/v1/completions", json=body, headers={"Origin": PAGE})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == PAGE  # the page sees why
    by_default = preflight(server.url, PAGE)  # no --allowed-origin: no page may
    assert by_default.status_code == 405 and "access-control-allow-origin" not in by_default.headers


@pytest.mark.parametrize("origin", ["https://app.example/", "app.example", "https://app.example/path", "ftp://x", ""])
def test_an_origin_a_browser_never_sends_stops_the_command(origin, monkeypatch, capsys):
    code, out, err = run_cli(["serve", "--allowed-origin", origin], monkeypatch, capsys)
    assert code == 2 and "--allowed-origin" in err and "expected scheme://host[:port]" in err, err
    assert "loading" not in err and "Traceback" not in err
