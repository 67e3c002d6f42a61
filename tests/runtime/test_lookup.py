"""Context-lookup drafts for greedy blt-s and blt-dv: the search itself, the defaults, and that a
request's bytes stay ar's whether its rounds drafted from the context or not (alone or in a batch)."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_refs import tiny_model, torch_generator

from fastblt.model.tokenizer import encode
from fastblt.runtime.batch import BatchEngine
from fastblt.runtime.generator import Generator
from fastblt.runtime.lookup import LOOKUP_MATCH, continuation
from fastblt.runtime.options import make_request


def ids(text: bytes) -> np.ndarray:
    return np.array(encode(text), dtype=np.int64)


def test_continuation_follows_the_latest_earlier_occurrence():
    history = ids(b"abcX1 abcY2 abc")  # BOS first, as a sequence's tokens are
    c = encode(b"Z", bos=False)[0]
    assert continuation(history, encode(b"c", bos=False)[0], 2, 5) == []  # "cc" never occurred
    got = continuation(history[:-1], encode(b"c", bos=False)[0], 3, 4)  # suffix "abc" -> "Y2 a"
    assert bytes(i - 4 for i in got) == b"Y2 a"
    assert continuation(history, c, 1, 3) == []  # "Z" is new
    assert len(continuation(history[:-1], encode(b"c", bos=False)[0], 3, 2)) == 2  # k of them


def test_continuation_never_matches_the_suffix_itself_and_continues_a_loop():
    history = ids(b"ab")
    b = encode(b"b", bos=False)[0]
    assert continuation(history[:-1], b, 2, 8) == []  # "ab" occurs only as the suffix
    got = continuation(ids(b"abab"), encode(b"a", bos=False)[0], 2, 7)  # suffix "ba": once before
    assert bytes(i - 4 for i in got) == b"bababab"  # what followed it, then on with the loop it is in
    assert continuation(ids(b"ab"), b, 5, 8) == []  # longer than the text
    assert continuation(ids(b"abab"), b, 0, 8) == [] and continuation(ids(b"abab"), b, 2, 0) == []


def test_lookup_defaults_to_greedy_verified_modes_only():
    config = tiny_model().config
    for mode in ("blt-s", "blt-dv"):
        assert make_request(b"x", config, mode).opts.lookup == LOOKUP_MATCH
        assert make_request(b"x", config, mode, temperature=0.7).opts.lookup == 0
        assert make_request(b"x", config, mode, lookup=0).opts.lookup == 0
    assert make_request(b"x", config, "ar").opts.lookup is None
    assert make_request(b"x", config, "blt-d").opts.lookup is None


@pytest.mark.parametrize("mode", ["blt-s", "blt-dv"])
def test_the_default_checkpoints_greedy_loop_is_drafted_from_the_context(mode):
    """The embedded default falls into repeating code on this prompt: rounds draft from what it
    wrote before, and the bytes are ar's."""
    g = Generator("default", backend="torch")
    prompt = 'import os\n\n\ndef fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b'
    ar = g.generate(prompt, mode="ar", max_bytes=160, stop_on_eos=False)
    got = g.generate(prompt, mode=mode, max_bytes=160, stop_on_eos=False)
    assert got.ids == ar.ids
    assert got.stats.lookup_rounds > 0 and got.stats.lookup_accepted > 0
    off = g.generate(prompt, mode=mode, max_bytes=160, stop_on_eos=False, lookup=0)
    assert off.ids == ar.ids and off.stats.lookup_rounds == 0
    assert got.stats.rounds < off.stats.rounds  # the context's drafts verified in longer runs


@pytest.mark.parametrize(("name", "mode"), [("hf-test-sizes", "blt-s"), ("small-window", "blt-s"),
                                             ("hf-test-sizes", "blt-dv")])  # fmt: skip
def test_a_batch_cohort_drafts_from_the_context_only_when_all_its_rows_can(name, mode):
    """A row alone, and two rows whose contexts both repeat, draft rounds from them (the pair in
    shared calls); beside a row that cannot (lookup 0, same cohort) a row drafts with the
    decoder. Bytes are ar's throughout."""
    g = torch_generator(name)
    prompt = "ab" * 40
    ar = g.generate(prompt, mode="ar", max_bytes=40, stop_on_eos=False).ids

    def together(batch, lookups):
        with batch._cv:  # all queued before the loop admits any: one cohort from the first round
            tickets = [batch.submit(make_request(prompt, g.config, mode, 40, lookup=lk, stop_on_eos=False))
                       for lk in lookups]  # fmt: skip
        return [t.result(60) for t in tickets]

    with BatchEngine(g.engine, max_batch=4) as batch:
        (alone,) = together(batch, [1])
        calls0, rows0 = dict(batch.stats.calls), dict(batch.stats.rows)
        pair = together(batch, [1, 1])
        calls = {s: batch.stats.calls[s] - calls0[s] for s in calls0}
        rows = {s: batch.stats.rows[s] - rows0[s] for s in rows0}
        mixed = together(batch, [1, 0])
    assert alone.ids == ar and alone.stats.lookup_rounds > 0
    assert all(t.ids == ar and t.stats.lookup_rounds > 0 for t in pair)
    # every call of the pair shared, but the prefill's: the second took a copy of the first's
    prefill = {s: sum(t.stats.prefill_passes.get(s, 0) for t in pair) for s in calls}
    assert all(rows[s] == 2 * calls[s] - prefill[s] for s in calls) and sum(prefill.values()) > 0
    assert [sum(t.stats.prefill_passes.values()) == 0 for t in pair] == [False, True]
    assert all(t.ids == ar and t.stats.lookup_rounds == 0 for t in mixed)
