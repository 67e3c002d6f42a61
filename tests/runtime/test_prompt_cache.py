"""Prompt snapshots: a call whose prompt begins with one committed before loads that instead of
committing it again, and computes exactly what its own prefill would have (every mode, greedy and
sampled, alone and in a batch); the cache keeps within its budget, least recently used first out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from runtime_refs import PROMPTS, torch_generator

from fastblt.errors import InputError
from fastblt.model.tokenizer import encode
from fastblt.runtime.batch import BatchEngine
from fastblt.runtime.generator import Generator
from fastblt.runtime.options import make_request
from fastblt.runtime.prompt_cache import MIN_CUT, Kept, PromptCache, cut, prompt_keys, split_points

MODES = ("ar", "blt-s", "blt-d", "blt-dv")
TEXT = ((PROMPTS[5] + PROMPTS[3] + PROMPTS[0]) * 12).encode()
LONG = TEXT[:700]  # split at 256 and 512 (the stride's multiples) and at its cut
NEXT = LONG + TEXT[::-1][:600]  # a conversation's next turn: it shares the ids below 512, not below LONG's cut
OTHER = b"# another file\n" + LONG[15:]  # the same length, other ids below every split point


def plain_generator() -> Generator:
    return torch_generator(max_context=2048)


def cached_generator() -> Generator:
    return torch_generator(max_context=2048, prompt_cache_mb=64)


def test_split_points_and_keys():
    """A prompt is split at every multiple of the stride (256, in whole chunks) below its cut, the
    last chunk boundary before its end; keys (deepest first) are digests of the ids below a point."""
    assert [cut(n, 32) for n in (1, 32, 33, 64, 65, 200)] == [0, 0, 32, 32, 64, 192]
    assert [split_points(n, 32) for n in (1, 33, 257, 300, 600)] == [[], [32], [256], [256, 288], [256, 512, 576]]
    assert split_points(600, 5) == [260, 520, 595]  # the stride in whole chunks
    ids = list(range(1100))
    keys = prompt_keys(ids, 32)
    assert [p for p, _ in keys] == [1088, 1024, 768, 512, 256]
    longer = dict(prompt_keys(ids + [7] * 40, 32))
    assert longer[1024] == dict(keys)[1024] and longer[512] == dict(keys)[512] and 1088 not in longer
    assert dict(prompt_keys(ids[:511] + [7] + ids[512:], 32))[512] != dict(keys)[512]  # every id below the point
    assert prompt_keys(ids, 5)[0][1] != keys[0][1]  # the chunk is part of the key
    assert prompt_keys(list(range(MIN_CUT)), 1) == []  # no point at MIN_CUT or past it


@pytest.mark.parametrize("mode", MODES)
def test_a_prompt_committed_before_is_loaded_and_computes_the_same(mode):
    """The same prompt again (greedy, then sampled with a seed) and one that differs only after its
    cut load the first call's snapshot at the cut; the next turn of a conversation loads the one at
    the stride point below it. Each equals, to the bit, a Generator without snapshots."""
    plain, g = plain_generator(), cached_generator()
    g.engine.prompts.clear()
    hits = g.engine.prompts.stats.hits
    q = cut(len(LONG) + 1, g.engine.max_step)  # BOS first
    calls = ((LONG, {}, 0), (LONG, {"temperature": 0.9, "seed": 3}, q), (LONG[:-1] + b"?", {}, q), (NEXT, {}, 512))
    for i, (prompt, options, loaded) in enumerate(calls):
        options |= {"max_bytes": 30, "stop_on_eos": False} | ({} if mode == "blt-d" else {"logprobs": 1})
        want = plain.generate(prompt, mode=mode, **options)
        other = bytes([65 + i]) + LONG[::-1]  # committed in full: the state the next call takes holds it
        g.generate(other, mode="ar", max_bytes=30)
        first = g.generate(prompt, mode=mode, **options)
        assert first.ids == want.ids and first.logprobs == want.logprobs  # the same computation, to the bit
        assert first.stats.prompt_cached == loaded
        assert (sum(first.stats.prefill_passes.values()) < sum(want.stats.prefill_passes.values())) == (loaded > 0)
    assert g.engine.prompts.stats.hits == hits + 3


def test_what_misses_and_what_is_not_kept():
    """Other ids below every split point or another prefill chunk: the prompt is committed in full;
    a request keeps snapshots at its two deepest points (none below MIN_CUT)."""
    g = cached_generator()
    g.engine.prompts.clear()
    stats = g.engine.prompts.stats
    stored, hits = stats.stored, stats.hits
    g.generate(LONG, mode="ar", max_bytes=4)
    assert (stats.stored, stats.hits) == (stored + 2, hits)
    for prompt, options in ((OTHER, {}), (LONG, {"prefill_chunk": 5})):
        out = g.generate(prompt, mode="ar", max_bytes=4, **options)
        assert out.stats.prompt_cached == 0
        assert out.ids == plain_generator().generate(prompt, mode="ar", max_bytes=4, **options).ids
    assert (stats.stored, stats.hits) == (stored + 6, hits)
    g.generate(b"x" * (MIN_CUT - 40), mode="ar", max_bytes=4)
    assert stats.stored == stored + 6


def test_a_scored_prompt_loads_only_snapshots_with_its_scores():
    """A request scoring its prompt (prompt_logprobs N) loads a snapshot only if it carries the
    prompt's scores with at least N top ids, then has every score, to the bit, that committing
    the prompt gives it; one that finds none commits it and keeps snapshots with its scores,
    replacing those with fewer. Requests that do not score load either kind."""
    plain, g = plain_generator(), cached_generator()
    g.engine.prompts.clear()
    stats = g.engine.prompts.stats
    hits = stats.hits
    q = cut(len(NEXT) + 1, g.engine.max_step)
    calls = [  # (prompt, prompt_logprobs, prompt ids loaded)
        (LONG, None, 0),  # keeps snapshots without scores
        (LONG, 2, 0),  # they do not serve it: commits, keeps snapshots with 2 top ids in their place
        (LONG, None, 672),  # a request that does not score loads a scored one
        (LONG[:-1] + b"?", 1, 672),  # fewer top ids: loads them, cut to 1
        (LONG, 3, 0),  # more top ids than kept: commits, keeps snapshots with 3
        (NEXT, 3, 512),  # the next turn, scored: the stride point's snapshot and its scores
        (NEXT, 0, q),  # its own cut's now
    ]
    for prompt, n, loaded in calls:
        options = {"max_bytes": 8, "stop_on_eos": False} | ({} if n is None else {"prompt_logprobs": n})
        want, out = plain.generate(prompt, mode="ar", **options), g.generate(prompt, mode="ar", **options)
        assert out.stats.prompt_cached == loaded, (prompt[-8:], n)
        assert out.ids == want.ids
        assert out.prompt_logprobs == want.prompt_logprobs and out.prompt_top_logprobs == want.prompt_top_logprobs
    assert stats.hits == hits + 4


def test_a_loaded_snapshot_is_the_saved_sequence():
    """Every buffer a sequence reads below its frontier is equal after a load into a state that held
    another sequence, and both continue with the same logits."""
    g = cached_generator()
    eng = g.engine
    a, b = eng.acquire(), eng.acquire()
    try:
        a.run(a.prefill(encode(LONG), 32))
        b.run(b.prefill(encode(OTHER), 32))
        snap = a.save()
        b.load(snap)
        assert (b.n, b.g_len) == (a.n, a.g_len)
        for name in ("tokens", "entropies", "closes", "patch_len"):
            assert np.array_equal(getattr(b.host, name)[: a.n], getattr(a.host, name)[: a.n])
        assert np.array_equal(b.host.closed[: a.n + 1], a.host.closed[: a.n + 1])
        assert torch.equal(b.h[: a.n], a.h[: a.n])
        for x, y in zip(b.rows._buffers(), a.rows._buffers(), strict=True):
            assert torch.equal(x, y)
        for name, cache in a.linear.items():
            for (k, v), (k2, v2) in zip(cache.kv, b.linear[name].kv, strict=True):
                assert torch.equal(k[..., : a.g_len, :], k2[..., : a.g_len, :])
                assert torch.equal(v[..., : a.g_len, :], v2[..., : a.g_len, :])
        more = encode("def f(x):\n    return x\n", bos=False)
        assert np.array_equal(a.run(a.append(more)), b.run(b.append(more)))
    finally:
        eng.release(a)
        eng.release(b)


def test_the_cache_keeps_within_its_budget_least_recently_used_first_out():
    g = cached_generator()
    st = g.engine.acquire()
    try:
        st.run(st.prefill(encode(LONG), 32))
        snap = st.save()
        assert st.saved_bytes() == snap.nbytes()  # what the cache asks before it takes one
    finally:
        g.engine.release(st)
    size, kept = snap.nbytes(), Kept(snap)
    cache = PromptCache(4.5 * size / 2**20)  # four of them
    for key in (b"a", b"b", b"c", b"d"):
        cache.put(key, kept)
    ids, n = encode(LONG), snap.n
    assert cache.find([(9, b"z"), (n, b"a")], ids) == (n, kept)  # the first key kept; now the most recently used
    cache.put(b"e", kept)
    assert [key in cache for key in (b"a", b"b", b"c", b"d", b"e")] == [True, False, True, True, True]
    assert (cache.stats.entries, cache.stats.evicted, cache.stats.bytes) == (4, 1, 4 * size)
    assert cache.find([(9, b"z")], ids) is None and (cache.stats.hits, cache.stats.misses) == (1, 1)
    # a key is a digest: a snapshot under it whose ids are not the prompt's is not used
    assert cache.find([(n, b"c")], encode(OTHER)) is None and cache.stats.misses == 2
    small = PromptCache(3.9 * size / 2**20)
    small.put(b"a", kept)  # over a quarter of its budget
    assert b"a" not in small and small.stats.bytes == 0


def test_requests_in_a_batch_load_and_keep_snapshots():
    """A batch row loads a snapshot a call alone kept, and keeps one a later call alone loads; every
    output equals its batch-1 output without snapshots, in every mode."""
    plain, g = plain_generator(), cached_generator()
    g.engine.prompts.clear()
    g.generate(LONG, mode="ar", max_bytes=4)
    work = [(p, m) for p in (LONG, OTHER) for m in MODES]
    want = [plain.generate(p, mode=m, max_bytes=24, stop_on_eos=False).ids for p, m in work]
    with BatchEngine(g.engine, 4, 16, backend_name=g.backend_name, params=g.params) as batch:
        tickets = [batch.submit(make_request(p, g.config, m, 24, stop_on_eos=False)) for p, m in work]
        got = [t.result(120) for t in tickets]
        shared = batch.stats.shared_prefills
    assert [o.ids for o in got] == want
    # OTHER's first request alone commits its whole prompt: the rest load a snapshot, or copy the
    # prefill of a request of their prompt admitted before theirs ended (batch.py)
    assert got[0].stats.prompt_cached > 0 and sum(o.stats.prompt_cached > 0 for o in got) + shared == 7
    assert g.generate(OTHER, mode="ar", max_bytes=24, stop_on_eos=False).stats.prompt_cached > 0


def test_a_budget_that_is_not_a_number_is_refused_before_loading():
    for bad in (-1, "64", float("nan"), True):
        with pytest.raises(InputError, match="prompt_cache_mb"):
            Generator("no/such/checkpoint", prompt_cache_mb=bad)
    with pytest.raises(InputError, match="prompt_cache_mb: not used with an Engine"):
        Generator(torch_generator().model, backend=torch_generator().engine, prompt_cache_mb=8)
