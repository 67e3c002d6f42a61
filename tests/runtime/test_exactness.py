"""Greedy exactness: ar == full recompute; blt-s and blt-dv == ar, byte for byte.

Includes drafts crossing several patch boundaries and fake drafts that are wrong at every
draft position in turn (forced rejections), which prove the rollback.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import re

import numpy as np
import pytest
import torch
from runtime_refs import PROMPTS, full_recompute_greedy, tiny_model, torch_generator

from fastblt.errors import InputError
from fastblt.model.config import BYTE_OFFSET, EOS_ID
from fastblt.model.tokenizer import encode
from fastblt.runtime import grammar, loops
from fastblt.runtime.generator import Generator

from tiny import TINY_CONFIGS

N_BYTES = 48


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[2]])
def test_ar_equals_full_recompute(name, prompt):
    g = torch_generator(name)
    want = full_recompute_greedy(tiny_model(name), prompt, N_BYTES, stop_on_eos=False)
    got = g.generate(prompt, mode="ar", max_bytes=N_BYTES, stop_on_eos=False)
    assert got.ids == want


@pytest.mark.parametrize("name", ["hf-test-sizes", "small-window"])
def test_ar_stops_at_eos_like_full_recompute(name):
    """A seed whose greedy output hits EOS within the budget: both stop there."""
    g = torch_generator(name)
    for prompt in PROMPTS:
        want = full_recompute_greedy(tiny_model(name), prompt, 64, stop_on_eos=True)
        got = g.generate(prompt, mode="ar", max_bytes=64)
        assert got.ids == want
        assert got.stop_reason == ("eos" if len(want) < 64 else "max_bytes")


@functools.cache
def _ar_cached(name: str, block_size: int, prompt, n: int) -> tuple[int, ...]:
    g = torch_generator(name, block_size)
    return tuple(g.generate(prompt, mode="ar", max_bytes=n, stop_on_eos=False).ids)


def _ar(prompt, n=N_BYTES, name="hf-test-sizes", block_size=4) -> list[int]:
    return list(_ar_cached(name, block_size, prompt, n))


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_blt_s_equals_ar(name, k):
    g = torch_generator(name)
    for prompt in PROMPTS:
        got = g.generate(prompt, mode="blt-s", max_bytes=N_BYTES, k=k, stop_on_eos=False)
        assert got.ids == _ar(prompt, name=name), (prompt, k)
        assert got.stats.drafted > 0


@pytest.mark.parametrize("name", ["hf-test-sizes", "small-window"])
@pytest.mark.parametrize("steering", ["bias", "penalties", "both"])
def test_logit_bias_and_penalties_steer_ar_as_a_full_recompute_and_the_verified_modes_equal_it(name, steering):
    """logit_bias and the presence / frequency penalties apply wherever a byte is chosen, drafted
    or verified: ar equals a full recompute whose argmax reads the steered logits (penalties on
    the ids generated before each position), and blt-s and blt-dv (drafts from the model and from
    the context, whose rows count the drafts before them) equal that ar byte for byte. Steering
    changes the bytes (the test would pass vacuously otherwise); a banned byte never appears."""
    g = torch_generator(name)
    for prompt in (PROMPTS[0], "ab" * 30):
        plain = _ar(prompt, name=name)
        banned = {b - 4: -100.0 for b in plain[:3] if b >= 4} if steering != "penalties" else {}
        bias = {**banned, ord("a"): 7.5} if steering != "penalties" else {}
        penalties = {"presence_penalty": 0.7, "frequency_penalty": 1.3} if steering != "bias" else {}
        want = full_recompute_greedy(tiny_model(name), prompt, N_BYTES, stop_on_eos=False, bias=bias,
                                     presence=penalties.get("presence_penalty", 0.0),
                                     frequency=penalties.get("frequency_penalty", 0.0))  # fmt: skip
        assert want != plain and not {b - 4 for b in want} & set(banned)
        opts = {"max_bytes": N_BYTES, "stop_on_eos": False, "logit_bias": bias, **penalties}
        assert g.generate(prompt, mode="ar", **opts).ids == want
        for mode, extra in [("blt-s", {"k": 4}), ("blt-s", {"lookup": 2}), ("blt-dv", {"lookup": 0})]:
            got = g.generate(prompt, mode=mode, **opts, **extra)
            assert got.ids == want, (mode, extra)


PROPERTIES = {"id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
              "ok": {"type": ["boolean", "null"]}}  # fmt: skip
SCHEMA = {"type": "object", "properties": PROPERTIES, "required": list(PROPERTIES), "additionalProperties": False}
# a recursive schema: the root refers to itself
TREE = {**SCHEMA, "properties": {"id": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#"}}},
        "required": ["id", "kids"]}  # fmt: skip
# a bounded integer, strings held to a format and to a pattern
DATED = {**SCHEMA, "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999, "multipleOf": 3},
                                  "day": {"type": "string", "format": "date", "pattern": "^20"},
                                  "tag": {"type": "string", "pattern": "^[a-z]+[0-9]?$", "maxLength": 4}},
         "required": ["id", "day", "tag"]}  # fmt: skip
# a map whose keys are held to a pattern, a tuple
MAPPED = {**SCHEMA, "properties": {"id": {"type": "object", "additionalProperties": {"type": "integer"},
                                          "maxProperties": 2, "propertyNames": {"pattern": "^[a-z]+$"}},
                                   "at": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}]}},
          "required": ["id", "at"]}  # fmt: skip


@pytest.mark.parametrize("name", ["hf-test-sizes", "small-window"])
@pytest.mark.parametrize("schema", [None, SCHEMA, TREE, DATED, MAPPED])
def test_json_mode_steers_ar_as_a_full_recompute_and_the_verified_modes_equal_it(name, schema, monkeypatch):
    """format="json" (any object, or one a schema admits): ar equals a full recompute whose argmax
    reads only the bytes the grammar allows after the output so far, and blt-s (model drafts,
    context drafts, which the grammar may refuse) and blt-dv (unconstrained diffusion drafts)
    equal that ar byte for byte. The model's drafts keep to the grammar too (verifying would
    repair them, at the cost of acceptance)."""
    accept = loops.accept

    def drafted_under_the_grammar(run, drafts, q, logits):
        if run.opts.mode == "blt-s" and not run.opts.lookup:
            assert grammar.advance(loops.current_grammar(run), drafts) is not None, drafts
        return accept(run, drafts, q, logits)

    monkeypatch.setattr(loops, "accept", drafted_under_the_grammar)
    g, model = torch_generator(name), tiny_model(name)
    root = grammar.JSON_OBJECT if schema is None else grammar.compile_schema(schema)
    for prompt in (PROMPTS[0], "ab" * 30):
        want = _masked_recompute(model, prompt, root)
        text = bytes(t - BYTE_OFFSET for t in want if t != EOS_ID)
        assert text.startswith(b"{") and want != _ar(prompt, name=name)
        if schema is not None:  # its first key comes next, whatever the model prefers
            assert text[1:].lstrip(b" \t\n\r").startswith(b'"id":')
        opts = {"max_bytes": N_BYTES, "format": "json", "schema": schema}
        got = g.generate(prompt, mode="ar", **opts)
        assert got.ids == [t for t in want if t != EOS_ID]
        assert got.stop_reason == ("eos" if EOS_ID in want else "max_bytes")
        for mode, extra in [("blt-s", {"k": 4, "lookup": 0}), ("blt-s", {"lookup": 2}), ("blt-dv", {"lookup": 0})]:
            assert g.generate(prompt, mode=mode, **opts, **extra).ids == got.ids, (mode, extra)


def _masked_recompute(model, prompt: str, root: grammar.Node) -> list[int]:
    """Greedy ids of a full recompute per byte whose argmax reads only what grammar `root` allows
    after the output so far (EOS, when it comes, last)."""
    ids, want, state = encode(prompt), [], grammar.begin(root)
    with torch.no_grad():
        for _ in range(N_BYTES):
            logits = model(torch.tensor([ids + want]))[0, -1].numpy() - grammar.mask(state)
            want.append(int(logits.argmax()))
            if want[-1] == EOS_ID:
                break
            state = grammar.step(state, want[-1] - BYTE_OFFSET)
    return want


@pytest.mark.parametrize("name", ["hf-test-sizes", "small-window"])
def test_free_text_with_calls_is_ar_until_a_call_opens_and_the_verified_modes_equal_it(name):
    """DecodeOptions.calls: free text is the model's own (ar's bytes) up to the first start text;
    from there a call held to its schema, then the end text; ar equals a full recompute under
    the grammar, blt-s and blt-dv equal ar. The start is two printable bytes ar writes, so a call
    opens where ar would have written them."""
    g, model = torch_generator(name), tiny_model(name)
    prompt = "x"
    plain = g.generate(prompt, mode="ar", max_bytes=N_BYTES).ids
    free = bytes(t - BYTE_OFFSET for t in itertools.takewhile(lambda t: t >= BYTE_OFFSET, plain))  # text: bytes only
    at = next(i for i in range(len(free) - 1) if all(0x21 <= b < 0x7F and b not in b"{" for b in free[i : i + 2]))
    start = free[at : at + 2]
    at = free.find(start)  # its first place
    calls = json.dumps({"start": start.decode(), "end": "\n</c>", "most": None, "lead": False, "schema": SCHEMA})
    want = _masked_recompute(model, prompt, grammar.tagged(calls))
    text = bytes(t - BYTE_OFFSET for t in want if t != EOS_ID)
    call = text[at + 2 :].lstrip(b" \t\n\r")
    assert text[: at + 2] == free[: at + 2] and call.startswith(b"{") and call[1:].lstrip(b" \t\n\r")[:3] == b'"id'
    got = g.generate(prompt, mode="ar", max_bytes=N_BYTES, calls=calls)
    assert got.ids == [t for t in want if t != EOS_ID]
    for mode, extra in [("blt-s", {"k": 4, "lookup": 0}), ("blt-s", {"lookup": 2}), ("blt-dv", {"lookup": 0})]:
        assert g.generate(prompt, mode=mode, max_bytes=N_BYTES, calls=calls, **extra).ids == got.ids, (mode, extra)


GRAMMAR = """start: expr
expr: term ((" + " | " - ") term)*
term: /[0-9]+/ | "(" expr ")" | /[a-z]+/ "(" [expr (", " expr)*] ")"
"""


@pytest.mark.parametrize("name", ["hf-test-sizes", "small-window"])
@pytest.mark.parametrize(
    "option, source",
    [
        ("pattern", r"[a-z]{2,6}( [a-z]+)*\."),
        ("pattern", r"(yes|no|maybe)"),
        ("pattern", r"\d+(\.\d{1,2})?[^\n]{0,9}é?"),
        ("grammar", GRAMMAR),
    ],
)
def test_a_regex_or_a_grammar_steers_ar_as_a_full_recompute_and_the_verified_modes_equal_it(name, option, source):
    """DecodeOptions.pattern and .grammar: ar equals a full recompute whose argmax reads only the
    bytes the regex (as a whole) or the grammar allows after the output so far, its text matches
    once EOS comes, and blt-s and blt-dv equal ar byte for byte."""
    g, model = torch_generator(name), tiny_model(name)
    root = grammar.matching(source) if option == "pattern" else grammar.derived(source)
    for prompt in (PROMPTS[0], "ab" * 30):
        want = _masked_recompute(model, prompt, root)
        got = g.generate(prompt, mode="ar", max_bytes=N_BYTES, **{option: source})
        assert got.ids == [t for t in want if t != EOS_ID] and got.ids != _ar(prompt, name=name)
        if got.stop_reason == "eos" and option == "pattern":
            assert re.fullmatch(source, got.text), got.text
        for mode, extra in [("blt-s", {"k": 4, "lookup": 0}), ("blt-s", {"lookup": 2}), ("blt-dv", {"lookup": 0})]:
            again = g.generate(prompt, mode=mode, max_bytes=N_BYTES, **{option: source}, **extra)
            assert again.ids == got.ids, mode


@pytest.mark.parametrize("mode", ["blt-s", "blt-dv"])
@pytest.mark.parametrize("name", ["hf-test-sizes", "small-window"])
@pytest.mark.parametrize("lookup", [1, 3, 16])
def test_context_drafts_equal_ar(mode, name, lookup):
    """Rounds that draft from the context (as long as a verify step takes, across patch
    boundaries and up to max_bytes) leave the output ar's; lookup=0 drafts none from it."""
    g = torch_generator(name)
    prompts = [*PROMPTS, PROMPTS[3] * 9, "ab" * 40]
    looked_up = 0
    for prompt in prompts:
        got = g.generate(prompt, mode=mode, max_bytes=N_BYTES, lookup=lookup, stop_on_eos=False)
        assert got.ids == _ar(prompt, name=name), (prompt, lookup)
        looked_up += got.stats.lookup_rounds
        assert got.stats.lookup_accepted <= got.stats.lookup_drafted
    if lookup < 16:  # a random model's output repeats no 16 bytes (the default checkpoint's does: test_lookup)
        assert looked_up > 0
    for n in (1, 2, 3, 5):  # drafts cut to the bytes still wanted
        got = g.generate("ab" * 40, mode=mode, max_bytes=n, lookup=lookup, stop_on_eos=False)
        assert got.ids == _ar("ab" * 40, n, name=name)
    off = g.generate(PROMPTS[3] * 9, mode=mode, max_bytes=N_BYTES, lookup=0, stop_on_eos=False)
    assert off.stats.lookup_rounds == 0 and off.ids == _ar(PROMPTS[3] * 9, name=name)


@pytest.mark.parametrize("name", ["hf-test-sizes", "small-window"])
def test_drafting_modes_reach_the_position_limit_exactly_as_ar(name):
    """Near the global model's position limit (in patches) a verify step's drafts could close
    patches past it: blt-s and blt-dv draft no more than the patches left, so they produce every
    byte ar produces and fail at the same max_bytes."""
    g = Generator(_forty_patches(name), backend="torch")
    prompt = "ab" * 5

    def fits(mode: str, n: int, **kw) -> bool:
        try:
            g.generate(prompt, mode=mode, max_bytes=n, stop_on_eos=False, **kw)
        except InputError:
            return False
        return True

    lo, hi = 1, 400  # ar fits lo bytes, not hi
    assert fits("ar", lo) and not fits("ar", hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits("ar", mid) else (lo, mid)
    ar = g.generate(prompt, mode="ar", max_bytes=lo, stop_on_eos=False).ids
    for mode, kw in [("blt-s", {"lookup": 0}), ("blt-s", {"lookup": 1}), ("blt-dv", {"lookup": 0}),
                     ("blt-dv", {"lookup": 1})]:  # fmt: skip
        assert g.generate(prompt, mode=mode, max_bytes=lo, stop_on_eos=False, **kw).ids == ar, (mode, kw)
        assert not fits(mode, hi, **kw), (mode, kw)


def _forty_patches(name: str):
    """A tiny model whose global model holds 40 patches: its position limit is reached in ~100 bytes."""
    model = tiny_model(name)
    small = copy.deepcopy(model)
    small.config = dataclasses.replace(
        model.config, global_model=dataclasses.replace(model.config.global_model, max_positions=40)
    )
    return small


@pytest.mark.parametrize("name", ["small-window", "deep-local"])
@pytest.mark.parametrize("block_start", ["force", "patch"])
def test_blt_d_fails_only_where_its_bytes_pass_the_position_limit(name, block_start):
    """blt-d commits each block but the last; a "force" block also needs a slot for its forced
    latent. At the limit it starts a block as "patch" does instead: a blt-d call fails only when
    the bytes it commits close more patches than the model holds, as ar would on those bytes."""
    g = Generator(_forty_patches(name), backend="torch")
    for prompt in ["ab" * 5, "hello world, ", "xyz" * 7, "def f(x):\n  return x\n"]:
        call = g._call(prompt, "blt-d", 400, {"stop_on_eos": False, "block_start": block_start})
        with pytest.raises(InputError, match="exceed the global model's limit of 40 patches") as blt_d:
            for _ in call:
                pass
        committed = prompt.encode() + bytes(call.out.data)  # the failing commit was of every byte out
        with pytest.raises(InputError) as ar:
            g.generate(committed, mode="ar", max_bytes=1, stop_on_eos=False)
        assert str(blt_d.value) == str(ar.value)  # the same patch count after the same bytes


# every model, block size, drafting rule and block-start rule appears (pairwise, not the full product)
DV_CASES = [
    ("hf-test-sizes", 4, "one-step", "force"),
    ("hf-test-sizes", 8, "confidence", "patch"),
    ("k4-global-projection", 8, "one-step", "patch"),
    ("k4-global-projection", 4, "entropy", "force"),
    ("deep-local", 4, "confidence", "force"),
    ("deep-local", 8, "entropy", "patch"),
    ("small-window", 4, "one-step", "patch"),
    ("small-window", 8, "confidence", "force"),
    ("small-window", 4, "entropy", "patch"),
]


@pytest.mark.parametrize(("name", "block_size", "unmask", "block_start"), DV_CASES)
def test_blt_dv_equals_ar(name, block_size, unmask, block_start):
    g = torch_generator(name, block_size)
    for prompt in PROMPTS[:4]:
        got = g.generate(
            prompt, mode="blt-dv", max_bytes=N_BYTES, unmask=unmask, block_start=block_start, stop_on_eos=False
        )
        assert got.ids == _ar(prompt, name=name, block_size=block_size), prompt


def test_max_bytes_respected_by_every_mode():
    g = torch_generator()
    for n in (1, 2, 3, 5, 9):
        ref = _ar("abc", n)
        assert len(ref) == n
        for mode in ("blt-s", "blt-dv"):
            assert g.generate("abc", mode=mode, max_bytes=n, stop_on_eos=False).ids == ref
        assert len(g.generate("abc", mode="blt-d", max_bytes=n, stop_on_eos=False).ids) == n


def _fake_drafter(truth: list[int], prompt_len: int, wrong_at: int, log: list, encode: bool):
    """Drafts the true continuation, except position wrong_at (of each round) is corrupted."""

    def drafter(run, c, k):  # a plan, as loops' drafters are
        st = run.state
        pos = st.n - prompt_len + 1  # index in truth of the byte after c
        drafts = list(truth[pos : pos + k])
        if wrong_at < len(drafts):
            drafts[wrong_at] = 4 + (drafts[wrong_at] + 7) % 256  # any other byte
        if encode:  # blt-s contract: encoder states of [c, drafts] at n..n+len
            yield from st.run_encoder(st.n, np.array([c, *drafts]))
        log.append((len(drafts), min(wrong_at, len(drafts))))
        return drafts, None

    return drafter


@pytest.mark.parametrize("mode", ["blt-s", "blt-dv"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_forced_rejection_at_every_draft_position(mode, k, monkeypatch):
    """Fake drafts wrong at position j: exactly j accepted per round, and the output is still ar's."""
    g = torch_generator("small-window")
    prompt = PROMPTS[3]
    n = 80
    truth = _ar(prompt, n + k + 2, name="small-window")
    prompt_len = len(prompt.encode()) + 1
    for wrong_at in [*range(k), k]:  # k: every draft right (bonus byte path)
        log: list = []
        drafter = _fake_drafter(truth, prompt_len, wrong_at, log, encode=(mode == "blt-s"))
        loop = loops.blt_s if mode == "blt-s" else loops.blt_dv
        monkeypatch.setitem(loops.LOOPS, mode, lambda run, logits, f=loop, d=drafter: f(run, logits, drafter=d))
        # lookup 0: every round through the fake drafter
        got = g.generate(prompt, mode=mode, max_bytes=n, k=k, stop_on_eos=False, lookup=0)
        assert got.ids == truth[:n], (mode, k, wrong_at)
        hist = got.stats.accept_hist
        full_rounds = [exp for drafted, exp in log if drafted == k or mode == "blt-dv"]
        assert full_rounds and all(a == wrong_at for a in full_rounds[:-1])
        assert set(hist) <= {exp for _, exp in log}


def test_blt_s_drafts_cross_several_patch_boundaries(monkeypatch):
    """Accepted drafts that span >= 2 patch boundaries occur (and the output is still exact)."""
    spans = []
    real = loops.rollback_to_accepted

    def spy(run, n0, drafts, a):
        real(run, n0, drafts, a)
        st = run.state
        spans.append(int(st.closed[st.n] - st.closed[n0]))

    monkeypatch.setattr(loops, "rollback_to_accepted", spy)
    g = torch_generator("small-window")
    for prompt in PROMPTS:
        got = g.generate(prompt, mode="blt-s", max_bytes=N_BYTES, k=8, stop_on_eos=False)
        assert got.ids == _ar(prompt, name="small-window")
    assert max(spans) >= 2
