"""The public API: options and bad input, streaming, stop conditions, sampling, threads, stats."""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from runtime_refs import PROMPTS, tiny_model, torch_generator

import fastblt
from fastblt.errors import BackendUnavailable, CapabilityError, FastBltError, InputError
from fastblt.export.spec import DEFAULT_MAX_STEP
from fastblt.model.config import BltDConfig
from fastblt.model.tokenizer import encode
from fastblt.runtime import grammar, loops
from fastblt.runtime.generator import Generation, Generator
from fastblt.runtime.options import DecodeOptions, Request, make_request
from fastblt.runtime.sampling import SamplingParams, probs_from_logits, sample
from fastblt.runtime.stream import Output, TextChunker

from tiny import make_model

CALLS = '{"start": "<c>", "end": "", "most": null, "lead": false, "schema": {"type": "object"}}'  # DecodeOptions.calls
BAD_OPTIONS = [
    (dict(mode="beam"), InputError, "mode"),
    (dict(max_bytes=0), InputError, "max_bytes"),
    (dict(max_bytes=2.5), InputError, "max_bytes"),
    (dict(temperature=-1.0), InputError, "temperature"),
    (dict(temperature=float("nan")), InputError, "temperature"),
    (dict(temperature=1.0, top_p=0.0), InputError, "top_p"),
    (dict(temperature=1.0, top_p=1.5), InputError, "top_p"),
    (dict(temperature=1.0, top_k=0), InputError, "top_k"),
    (dict(seed=-3), InputError, "seed"),
    (dict(mode="blt-s", k=0), InputError, "option k"),
    (dict(mode="ar", k=4), InputError, "option k: only blt-s and blt-dv"),
    (dict(mode="blt-s", lookup=-1), InputError, "option lookup"),
    (dict(mode="blt-s", lookup=2.0), InputError, "option lookup"),
    (dict(mode="blt-s", lookup=16, temperature=0.8), InputError, "option lookup: context drafts are for greedy"),
    (dict(mode="ar", lookup=16), InputError, "option lookup: only blt-s and blt-dv"),
    (dict(mode="blt-d", unmask="one-step"), InputError, "unmask"),
    (dict(mode="blt-d", alpha=1.5), InputError, "alpha"),
    (dict(mode="blt-d", gamma=-1.0), InputError, "gamma"),
    (dict(mode="ar", alpha=0.5), InputError, "unmask/alpha/gamma"),
    (dict(block_start="middle"), InputError, "block_start"),
    (dict(mode="ar", block_start="patch"), InputError, "option block_start: only blt-d and blt-dv"),
    (dict(mode="blt-s", block_start="patch"), InputError, "option block_start: only blt-d and blt-dv"),
    (dict(temperature=np.bool_(True)), InputError, "temperature"),
    (dict(stop=[""]), InputError, "stop"),
    (dict(stop=[3]), InputError, "stop"),
    (dict(stop_on_eos="yes"), InputError, "stop_on_eos"),
    (dict(beam_width=4), InputError, "unknown"),
    (dict(logit_bias={256: -100}), InputError, r"option logit_bias byte: expected an int in \[0, 255\]"),
    (dict(logit_bias={10: 100.5}), InputError, r"option logit_bias\[10\]: expected a number"),
    (dict(logit_bias={10: float("nan")}), InputError, r"option logit_bias\[10\]"),
    (dict(logit_bias={True: 1}), InputError, "option logit_bias byte"),
    (dict(logit_bias=[(10, 1), (10, 2)]), InputError, "option logit_bias: byte 10 is given twice"),
    (dict(logit_bias=[(10,)]), InputError, "option logit_bias: expected"),
    (dict(logit_bias=7), InputError, "option logit_bias: expected"),
    (dict(presence_penalty=2.5), InputError, r"option presence_penalty: expected a number in \[-2.0, 2.0\]"),
    (dict(frequency_penalty=float("inf")), InputError, "option frequency_penalty"),
    (dict(frequency_penalty="1"), InputError, "option frequency_penalty"),
    (dict(presence_penalty=None, frequency_penalty=-3), InputError, "option frequency_penalty"),
    (dict(mode="ar", format="xml"), InputError, "option format: 'xml' is unknown; choose one of json"),
    (dict(format="json"), InputError, "option format: blt-d's diffusion head chooses"),
    (dict(schema={"type": "object"}), InputError, "option format: blt-d's diffusion head chooses"),
    (dict(mode="ar", schema={"type": "string"}), InputError, "option schema: the root must be an object"),
    (dict(mode="ar", schema="{"), InputError, "option schema: not JSON"),
    (dict(mode="ar", schema=5), InputError, "option schema: expected a JSON schema"),
    (
        dict(mode="ar", schema={"properties": {"a": {"contains": {}}}, "required": ["a"]}),
        InputError,
        r"option schema\.properties\.a\.contains: not supported",
    ),  # fmt: skip
    (dict(mode="ar", calls=CALLS, format="json"), InputError, "option calls: free text with calls is a format of"),
    (dict(mode="ar", calls=CALLS, schema={"type": "object"}), InputError, "option calls: free text with calls"),
    (dict(calls=CALLS), InputError, "option format: blt-d's diffusion head chooses"),
    (dict(mode="ar", calls=CALLS.replace('"most": null', '"most": -1')), InputError, r"option calls\.most"),
    (dict(mode="ar", calls={"start": "<c>"}), InputError, "option calls: expected JSON text"),
    (dict(mode="ar", format="calls"), InputError, "option format: 'calls' is unknown; choose one of json"),
    (dict(mode="ar", pattern="a", schema={"type": "object"}), InputError, "option pattern: a text held to a regular"),
    (dict(mode="ar", pattern="a", format="json"), InputError, "option pattern: a text held to a regular"),
    (dict(pattern="a"), InputError, "option format: blt-d's diffusion head chooses"),
    (dict(mode="ar", pattern="(?<=a)b"), InputError, "option pattern: lookbehinds"),
    (dict(mode="ar", pattern=["a"]), InputError, "option pattern: expected a regular expression"),
    (dict(mode="ar", format="regex"), InputError, "option format: 'regex' is unknown; choose one of json"),
    (dict(mode="ar", grammar='start: "a"', pattern="a"), InputError, "option grammar: a text held to a grammar"),
    (dict(grammar='start: "a"'), InputError, "option format: blt-d's diffusion head chooses"),
    (dict(mode="ar", grammar="start: b"), InputError, "option grammar: rule b is used but not defined"),
    (dict(mode="ar", grammar=3), InputError, "option grammar: expected a grammar's text"),
    (dict(priority=True), InputError, "option priority: expected an int"),
    (dict(priority=2**31), InputError, r"option priority: expected an int in \[-2147483648, 2147483647\]"),
]


@pytest.mark.parametrize("mode", ["ar", "blt-s", "blt-d", "blt-dv"])
def test_a_logit_bias_of_100_makes_every_byte_its_byte_in_every_mode(mode):
    """+100 on one byte outweighs any logit: greedy and sampled, drafted, verified or unmasked by
    the diffusion head, every byte is that one; -100 on bytes 0-199 and sampled with one seed
    twice: none of them comes (without the bias most would: the tiny model's bytes are nearly
    uniform), and the draws are the same."""
    g = torch_generator()
    for opts in ({}, {"temperature": 1.0, "seed": 3}):
        got = g.generate("def f(", mode=mode, max_bytes=24, stop_on_eos=False, logit_bias={120: 100}, **opts)
        assert got.bytes == b"x" * 24, (mode, opts)
    opts = {"temperature": 1.0, "seed": 11, "stop_on_eos": False}
    assert min(g.generate("def f(", mode=mode, max_bytes=40, **opts).bytes) < 200
    biased = {**opts, "logit_bias": dict.fromkeys(range(200), -100)}
    first, again = (g.generate("def f(", mode=mode, max_bytes=40, **biased) for _ in range(2))
    assert first.ids == again.ids and len(first.bytes) > 20 and min(first.bytes) >= 200


@pytest.mark.parametrize(("options", "error", "match"), BAD_OPTIONS)
def test_bad_options_fail_before_any_work(options, error, match):
    from fastblt.engines.torch_backend import TorchBackend
    from fastblt.export.spec import step_specs
    from fastblt.validate.recording import RecordingBackend

    model = tiny_model()
    backend = RecordingBackend(TorchBackend(step_specs(model.config), model), trace=True)
    g = Generator(model, backend=backend)
    with pytest.raises(error, match=match):
        g.generate("abc", **{"max_bytes": 8, **options})
    with pytest.raises(error, match=match):
        g.stream("abc", **{"max_bytes": 8, **options})  # checked at the call, not at next()
    assert backend.trace == []  # no step ran


def test_numpy_scalars_are_numbers_and_come_back_plain():
    """A service passes what its own numpy code computed; the options hold plain Python numbers
    (batch cohorts compare them, JSON records hold them), and the bytes equal plain arguments'."""
    g = torch_generator()
    given = dict(max_bytes=np.int64(12), temperature=np.float32(0.5), top_k=np.int8(5), seed=np.uint32(7))
    req = make_request("abc", g.config, "blt-s", **given)
    plain = {"max_bytes": 12, "temperature": float(np.float32(0.5)), "top_k": 5, "seed": 7}
    assert {name: getattr(req.opts, name) for name in plain} == plain
    assert all(type(getattr(req.opts, n)) is type(v) for n, v in plain.items())
    assert g.generate(req).ids == g.generate("abc", mode="blt-s", **plain).ids


def test_diffusion_modes_default_to_the_papers_unmasking_settings():
    """Options left unset take the documented per-mode defaults: blt-d unmasks by confidence
    (alpha 0.7, the paper's headline; entropy gamma 1.0), blt-dv drafts in one step (its
    confidence alpha 0.3, entropy gamma 1.5: the permissive settings). A wrong default silently
    changes every call's bytes and speed."""
    cfg = tiny_model().config
    d = make_request(b"x", cfg, "blt-d").opts
    assert (d.unmask, d.alpha, d.gamma) == ("confidence", 0.7, 1.0)
    dv = make_request(b"x", cfg, "blt-dv").opts
    assert (dv.unmask, dv.alpha, dv.gamma) == ("one-step", 0.3, 1.5)
    # blocks: blt-d as the paper's Algorithm 1 (force-close the open patch); blt-dv at the open
    # patch's start (lossless either way; its drafts verify more often there), unless asked
    assert (d.block_start, dv.block_start) == ("force", "patch")
    assert make_request(b"x", cfg, "blt-dv", block_start="force").opts.block_start == "force"
    assert make_request(b"x", cfg, "ar", block_start="force").opts.block_start == "force"


def test_bad_prompts_and_max_context():
    g = torch_generator(max_context=64)
    with pytest.raises(InputError, match="empty"):
        g.generate("", mode="ar")
    with pytest.raises(InputError, match="str or bytes"):
        g.generate(123, mode="ar")
    with pytest.raises(InputError, match="81 prompt ids \\+ 1 bytes = 82 exceed max_context 64"):
        g.generate("x" * 80, mode="ar", max_bytes=1)
    with pytest.raises(InputError, match="lower max_bytes or raise max_context"):
        g.generate("x" * 40, mode="blt-d", max_bytes=24)  # 41 + 24 > 64
    assert len(g.generate("x" * 40, mode="ar", max_bytes=23).ids) <= 23  # 41 + 23 = 64 fits
    with pytest.raises(InputError, match=f"prefill_chunk: 200 exceeds the graphs' max_step {DEFAULT_MAX_STEP}"):
        g.generate("x", mode="ar", max_bytes=1, prefill_chunk=200)


def test_the_global_models_position_limit_is_a_clear_error():
    """Past the global model's position limit (in patches) the call stops with an error naming it
    and the bytes consumed; up to it, a prompt of any length works."""
    model = tiny_model("small-window")
    limited = dataclasses.replace(model.config.global_model, max_positions=40)
    small = copy.deepcopy(model)
    small.config = dataclasses.replace(model.config, global_model=limited)
    g = Generator(small, backend="torch")
    with pytest.raises(InputError, match=r"exceed the global model's limit of 40 patches \(reached after \d+ bytes\)"):
        g.generate("y" * 400, mode="ar", max_bytes=4)
    assert len(g.generate("y" * 10, mode="ar", max_bytes=4, stop_on_eos=False).ids) == 4


def test_bytes_prompts_are_fine():
    g = torch_generator()
    out = g.generate(b"\xff\xfe\x80 not utf-8", mode="ar", max_bytes=8, stop_on_eos=False)
    assert len(out.ids) == 8


def test_unknown_backend_and_plain_blt_checkpoint():
    with pytest.raises(InputError, match="backend 'cuda'"):
        Generator(tiny_model(), backend="cuda")
    plain = make_model(blt_d=False)
    g = Generator(plain, backend="torch", max_context=128)
    with pytest.raises(CapabilityError, match="BLT-D checkpoint"):
        g.generate("abc", mode="blt-d")
    with pytest.raises(CapabilityError):
        g.generate("abc", mode="blt-dv")
    assert len(g.generate("abc", mode="blt-s", max_bytes=5, stop_on_eos=False).ids) == 5
    with pytest.raises(InputError, match="artifacts"):
        Generator(tiny_model(), backend="torch", artifacts="/nonexistent")


def test_trt_unavailable_is_a_clear_error():
    from fastblt.engines.registry import available

    if available()["trt"].available:
        pytest.skip("TensorRT is available here")
    with pytest.raises(BackendUnavailable, match="trt"):
        Generator(tiny_model(), backend="trt")


def test_public_exports_are_lazy():
    assert fastblt.Generator is Generator
    assert fastblt.Generation is Generation


def test_a_cached_export_loads_without_the_exporters_imports(tmp_path):
    """Start-up cost: loading a checkpoint and finding its graphs in the cache import neither onnx
    (~0.5 s; only exporting needs it) nor torch._dynamo (~0.8 s; the meta device's normal_ would)."""
    code = (
        "import sys, fastblt\n"
        "g = fastblt.Generator('default', cache_dir=sys.argv[1])\n"
        "g.generate('def f(', mode='ar', max_bytes=4)\n"
        "print(sorted(m for m in ('onnx', 'torch._dynamo') if m in sys.modules))\n"
    )
    run = [sys.executable, "-c", code, str(tmp_path)]
    first = subprocess.run(run, capture_output=True, text=True, timeout=300, check=True)  # exports
    assert "onnx" in first.stdout
    again = subprocess.run(run, capture_output=True, text=True, timeout=300, check=True)
    assert again.stdout.strip() == "[]"


# ------------------------------------------------------------------------ streaming and stops
def test_text_chunker_keeps_utf8_and_stop_prefixes_whole():
    ch = TextChunker(stop=(b"END",))
    data = bytearray()
    chunks = []
    for piece in [b"caf", b"\xc3", b"\xa9 E", b"N", b"D?"]:
        data += piece
        chunks.append(ch.take(data))
    # "\xc3" waits for its second byte; "E" and "EN" are held while they may start "END"
    # (Output cuts a real stop string before the chunker sees it); "END?" cannot be a stop any more
    assert chunks == ["caf", "", "é ", "", "END?"]
    data += b"E"
    assert ch.take(data) == "" and ch.take(data, final=True) == "E"


def test_text_chunker_holds_the_longest_stop_prefix_the_output_ends_with():
    """The chunker's running match (updated by each chunk's new bytes) against the definition:
    the longest proper prefix of any stop string that the output ends with, on random outputs over
    small alphabets (overlapping, self-similar stops) grown in random chunks."""
    rng = random.Random(0)

    def longest(stops, data):
        return max((n for s in stops for n in range(len(s)) if data.endswith(s[:n])), default=0)

    for trial in range(2000):
        alphabet = b"ab" if trial % 2 else b"abc"
        stops = tuple(bytes(rng.choices(alphabet, k=rng.randint(1, 7))) for _ in range(rng.randint(1, 4)))
        ch, data = TextChunker(stops), bytearray()
        for _ in range(rng.randint(1, 12)):
            data += bytes(rng.choices(alphabet, k=rng.randint(0, 5)))
            assert ch._held(data) == longest(stops, data), (stops, bytes(data))
    long_stop = b"q" * 5000 + b"a"
    ch, data = TextChunker((long_stop,)), bytearray(b"x")
    for _ in range(4999):
        data += b"q"
        assert ch.take(data) == ("x" if len(data) == 2 else "")
    data += b"r"
    assert ch.take(data) == "q" * 4999 + "r"


def test_output_stop_conditions():
    out = Output(max_bytes=10, stop=(b"ab",))
    assert not out.push([4 + ord("x"), 4 + ord("a")])
    assert out.push([4 + ord("b"), 4 + ord("z")])
    assert out.stop_reason == "stop" and bytes(out.data) == b"x" and len(out.ids) == 3
    out = Output(max_bytes=3, stop_on_eos=False)  # EOS is then an ordinary id
    assert out.push([5, 6, 2, 7]) and out.stop_reason == "max_bytes" and out.ids == [5, 6, 2]
    out = Output(max_bytes=5, stop_on_eos=True)
    assert out.push([5, 2, 7]) and out.stop_reason == "eos" and out.ids == [5]


def test_output_keeps_the_zero_byte():
    """Id 4 is byte 0x00, a byte like any other: a binary output keeps it, and a stop string that
    holds it ends the output there."""
    out = Output(5)
    assert not out.push([4, 5])
    assert bytes(out.data) == b"\x00\x01"
    out = Output(max_bytes=5, stop=(b"\x00",))
    assert out.push([5, 4, 6])
    assert out.stop_reason == "stop" and bytes(out.data) == b"\x01" and out.ids == [5, 4]


@pytest.mark.parametrize("mode", ["ar", "blt-s", "blt-dv", "blt-d"])
def test_stream_concatenates_to_generate(mode):
    g = torch_generator()
    ref = g.generate(PROMPTS[0], mode=mode, max_bytes=40, stop_on_eos=False)
    it = g.stream(PROMPTS[0], mode=mode, max_bytes=40, stop_on_eos=False)
    chunks = []
    while True:
        try:
            chunks.append(next(it))
        except StopIteration as stop:
            result = stop.value
            break
    assert "".join(chunks) == ref.text
    assert result.bytes == ref.bytes and result.ids == ref.ids
    if mode != "blt-d":
        assert len(chunks) > 1


@pytest.mark.parametrize("mode", ["ar", "blt-s", "blt-dv", "blt-d"])
def test_stop_string_cuts_the_output(mode):
    g = torch_generator()
    full = g.generate(PROMPTS[1], mode=mode, max_bytes=48, stop_on_eos=False)
    stop = full.bytes[20:22]
    cut = full.bytes.find(stop)
    out = g.generate(PROMPTS[1], mode=mode, max_bytes=48, stop=[stop], stop_on_eos=False)
    assert out.stop_reason == "stop"
    assert out.bytes == full.bytes[:cut]
    assert "".join(g.stream(PROMPTS[1], mode=mode, max_bytes=48, stop=[stop], stop_on_eos=False)) == out.text


# ------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("mode", ["ar", "blt-s", "blt-dv", "blt-d"])
def test_seeded_sampling_is_reproducible(mode):
    g = torch_generator()
    kw = dict(mode=mode, max_bytes=30, temperature=0.8, top_p=0.95, top_k=50, stop_on_eos=False)
    a = g.generate(PROMPTS[3], seed=5, **kw)
    b = g.generate(PROMPTS[3], seed=5, **kw)
    assert a.ids == b.ids and len(a.ids) == 30


def _chi2_z(counts: dict, probs: dict, n: int) -> float:
    """Wilson-Hilferty z of Pearson's statistic over the cells of probs."""
    stat = sum((counts.get(c, 0) - n * p) ** 2 / (n * p) for c, p in probs.items() if p > 0)
    assert all(probs.get(c, 0) > 0 for c in counts), "a sample outside p's support"
    df = sum(1 for p in probs.values() if p > 0) - 1
    return ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


def _skewed_drafter(encode_states: bool):
    """Draws drafts from a fixed q far from p (half its mass outside p's top-3 support)."""

    def drafter(run, c, k):  # a plan (it may yield step calls), as loops' drafters are
        q = np.zeros((k, 260), dtype=np.float32)
        q[:, 4 + 97 : 4 + 97 + 6] = [0.3, 0.1, 0.1, 0.2, 0.2, 0.1]
        q[:, 4 + 32] = 0.0
        q = q / q.sum(-1, keepdims=True)
        drafts = sample(q, run.gen).tolist()
        if encode_states:
            yield from run.state.run_encoder(run.state.n, np.array([c, *drafts]))
        return drafts, q

    return drafter


def _mask(state) -> torch.Tensor:
    return torch.from_numpy(grammar.mask(state).copy())


@pytest.mark.parametrize(
    ("mode", "drafter", "steered"),
    [("blt-s", "real", False), ("blt-dv", "real", False), ("blt-s", "skewed", False), ("blt-s", "skewed", True),
     ("blt-dv", "real", True), ("blt-s", "skewed", "json"), ("blt-dv", "real", "json")],
)  # fmt: skip
def test_speculative_sampling_matches_ar_distribution(mode, drafter, steered, monkeypatch):
    """The first two sampled bytes of blt-s / blt-dv follow the exact AR joint distribution
    (the second one goes through draft + acceptance), with the real drafters and with a draft
    distribution far from p (which a wrong acceptance rule would not survive); steered, under a
    logit bias that changes the top ids and presence / frequency penalties on the first byte,
    computed here by hand; in JSON mode, under the grammar's masks (the skewed drafts, letters,
    are never allowed after "{": every one is rejected)."""
    if drafter == "skewed":
        f = _skewed_drafter(encode_states=mode == "blt-s")
        monkeypatch.setitem(loops.LOOPS, mode, lambda run, logits: loops.blt_s(run, logits, drafter=f))
    model = tiny_model()
    g = torch_generator()
    params = SamplingParams(temperature=1.0, top_k=3)
    ids = encode(PROMPTS[3])
    steer = {}
    with torch.no_grad():
        first = model(torch.tensor([ids]))[0, -1]
        add, presence, frequency = torch.zeros(len(first)), 0.0, 0.0
        if steered is True:  # ban the top id, lift the 4th one above all at both positions: the likeliest
            # first byte, and the penalties then take it off the second one's lead (unpenalised, a
            # sampler would repeat it)
            top = first.argsort(descending=True)[:4].tolist()
            second = model(torch.tensor([ids + [top[3]]]))[0, -1]
            lift = float(max(first.max() - first[top[3]], second.max() - second[top[3]])) + 1.0
            steer = {"logit_bias": {top[0] - 4: -100, top[3] - 4: lift}, "presence_penalty": 0.5,
                     "frequency_penalty": 1.5}  # fmt: skip
            add[top[0]], add[top[3]] = -100, lift
            presence, frequency = 0.5, 1.5
        if steered == "json":
            steer = {"format": "json"}
        masked = steered == "json"
        p1 = probs_from_logits(first + add - (_mask(grammar.BEGIN) if masked else 0), params)
        joint = {}
        for b1 in np.flatnonzero(p1).tolist():
            penalty = torch.zeros(len(first))
            penalty[b1] = frequency + presence  # b1 generated once
            if masked:
                penalty = penalty + _mask(grammar.step(grammar.BEGIN, b1 - 4))
            p2 = probs_from_logits(model(torch.tensor([ids + [b1]]))[0, -1] + add - penalty, params)
            for b2 in np.flatnonzero(p2).tolist():
                joint[(b1, b2)] = float(p1[b1] * p2[b2])
    n, counts, drafted = 800, {}, 0
    kw = dict(mode=mode, max_bytes=3, temperature=1.0, top_k=3, stop_on_eos=False, **steer)
    if mode == "blt-s":
        kw["k"] = 1
    for seed in range(n):
        out = g.generate(PROMPTS[3], seed=seed, **kw)
        key = tuple(out.ids[:2])
        counts[key] = counts.get(key, 0) + 1
        drafted += out.stats.drafted
    assert drafted >= n
    assert _chi2_z(counts, joint, n) < 3.72  # p ~ 1e-4


# ------------------------------------------------------------------------ threads and stats
def test_threads_share_a_generator_safely():
    g = torch_generator()
    jobs = [(p, m) for p in PROMPTS[:3] for m in ("ar", "blt-s", "blt-dv", "blt-d")]
    want = {job: g.generate(job[0], mode=job[1], max_bytes=24, stop_on_eos=False).ids for job in jobs}
    got: dict = {}
    errors: list = []

    def worker(job):
        try:
            got[job] = g.generate(job[0], mode=job[1], max_bytes=24, stop_on_eos=False).ids
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == want


def test_stats_are_consistent():
    g = torch_generator()
    for mode in ("ar", "blt-s", "blt-dv", "blt-d"):
        s = g.generate(PROMPTS[0], mode=mode, max_bytes=40, stop_on_eos=False).stats
        assert s.generated == 40 and s.stop_reason == "max_bytes"
        dec = s.passes["decoder"] + s.passes["decoder_block"]
        assert s.bytes_per_decoder_pass == pytest.approx(40 / dec)
        assert s.bytes_per_global_pass == pytest.approx(40 / s.passes["global"]) if s.passes["global"] else True
        assert 0 <= s.backend_s <= s.wall_s and s.host_s == pytest.approx(s.wall_s - s.backend_s)
        assert s.prefill_passes["decoder"] == 1
        assert set(s.eq8) == {"this", "blt-1b", "blt-3b"}
        for split in s.eq8.values():
            assert 0 < split["gb"] <= split["gb_with_entropy"]
        if mode == "ar":
            assert s.passes["entropy"] == s.passes["decoder"] == 39  # the last byte is never appended
            assert s.acceptance_rate is None
        if mode in ("blt-s", "blt-dv"):
            assert s.drafted > 0 and sum(s.accept_hist.values()) == s.rounds
            assert s.acceptance_rate == pytest.approx(s.accepted / s.drafted)
        if mode == "blt-d":
            assert sum(s.unmask_steps.values()) == s.rounds == math.ceil(40 / 4)
            assert s.passes["global"] <= s.rounds  # one global pass per block (merged force-close)
    ar = g.generate(PROMPTS[0], mode="ar", max_bytes=40, stop_on_eos=False).stats
    d = g.generate(PROMPTS[0], mode="blt-d", max_bytes=40, stop_on_eos=False).stats
    assert d.eq8["blt-1b"]["bytes_per_byte"] < ar.eq8["blt-1b"]["bytes_per_byte"]


def test_ar_counts_a_round_per_appended_byte():
    """ar's rounds are its decoding steps: one per byte appended after the first (the last byte is
    never appended), as many as its decoder passes, so rounds-based reports (bytes per round) of ar
    are not zero or off."""
    s = torch_generator().generate(PROMPTS[0], mode="ar", max_bytes=25, stop_on_eos=False).stats
    assert s.rounds == s.generated - 1 == s.passes["decoder"] == 24


def test_blt_s_drafts_no_more_than_the_output_can_still_take(monkeypatch):
    """A blt-s round's pending byte takes one place of what is left of max_bytes, so it drafts at
    most `remaining - 1` bytes: a draft past max_bytes is work (a decoder pass per byte) whose
    result can never be output. A call of max_bytes 2 has no room for any draft."""
    asked = []

    def drafter(run, c, k):
        asked.append((k, run.out.remaining))
        return (yield from loops.draft_ar(run, c, k))

    monkeypatch.setitem(loops.LOOPS, "blt-s", lambda run, logits: loops.blt_s(run, logits, drafter=drafter))
    g = torch_generator()
    kw = dict(mode="blt-s", stop_on_eos=False, lookup=0)
    out = g.generate(PROMPTS[0], max_bytes=12, **kw)
    assert asked and all(k <= remaining - 1 for k, remaining in asked)
    assert asked[0] == (10, 11)  # the first round drafts all the output can still take
    assert out.ids == g.generate(PROMPTS[0], mode="ar", max_bytes=12, stop_on_eos=False).ids
    assert g.generate(PROMPTS[0], max_bytes=2, **kw).stats.drafted == 0


def test_errors_are_fastblt_errors():
    assert issubclass(InputError, FastBltError) and issubclass(CapabilityError, FastBltError)
    assert BltDConfig().block_size == 8


# ------------------------------------------------------------------------------ a Backend instance
def test_a_backend_instance_runs_like_the_backend_by_name():
    from fastblt.engines.torch_backend import TorchBackend
    from fastblt.export.spec import step_specs

    model = tiny_model()
    backend = TorchBackend(step_specs(model.config, max_step=16), model)
    g = Generator(model, backend=backend)
    assert (g.engine.max_step, g.backend_name) == (16, "torch")
    want = torch_generator().generate("def main(", mode="blt-d", max_bytes=12, stop_on_eos=False)
    assert g.generate("def main(", mode="blt-d", max_bytes=12, stop_on_eos=False).ids == want.ids


def test_a_backend_instance_for_another_model_or_with_options_is_refused():
    from fastblt.engines.torch_backend import TorchBackend
    from fastblt.export.spec import step_specs

    model, other = tiny_model(), make_model("deep-local")
    with pytest.raises(InputError, match="backend torch: step encoder does not match this checkpoint's config"):
        Generator(model, backend=TorchBackend(step_specs(other.config), other))
    with pytest.raises(InputError, match="threads, device: not used with a Backend instance"):
        Generator(model, backend=TorchBackend(step_specs(model.config), model), threads=1, device="cpu")


def test_the_default_draft_length_fits_graphs_of_any_max_step():
    """blt-s drafts 16 bytes per round by default, max_step - 1 on graphs too small for a verify
    step of 17 positions; an explicit k that does not fit is refused, naming it."""
    from fastblt.engines.torch_backend import TorchBackend
    from fastblt.export.spec import DEFAULT_K, step_specs
    from fastblt.runtime.options import draft_length, make_options

    assert DEFAULT_K == 16
    assert draft_length(make_options(), 32) == 16 and draft_length(make_options(), 8) == 7
    assert draft_length(make_options(k=4), 32) == 4
    model = tiny_model()
    small = Generator(model, backend=TorchBackend(step_specs(model.config, max_step=8), model))
    out = small.generate("def main(", mode="blt-s", max_bytes=30, stop_on_eos=False)
    assert max(out.stats.accept_hist) <= 7 and out.stats.drafted <= 7 * out.stats.rounds  # rounds of <= 7 drafts
    assert out.ids == torch_generator().generate("def main(", mode="ar", max_bytes=30, stop_on_eos=False).ids
    with pytest.raises(InputError, match="option k: 8 drafts \\+ 1 exceed the graphs' max_step 8"):
        small.generate("def main(", mode="blt-s", max_bytes=30, k=8)
    big = torch_generator().generate("def main(", mode="blt-s", max_bytes=40, stop_on_eos=False)
    assert big.stats.drafted > 8 * big.stats.rounds  # the default's rounds draft more than the old 8


def test_text_that_is_not_utf8_and_ids_that_are_not_ids_are_input_errors():
    g = torch_generator()
    with pytest.raises(InputError, match="prompt: not encodable as UTF-8"):
        g.generate("x\ud800", mode="ar", max_bytes=2)
    with pytest.raises(InputError, match="option stop: .* not encodable as UTF-8"):
        g.generate("x", mode="ar", max_bytes=2, stop="\ud800")
    for ids in (b"hi", "abc", None, [104.9], [float("nan")], torch.tensor([[108, 109]])):
        with pytest.raises(InputError, match="ids: expected"):
            fastblt.decode(ids)
    assert fastblt.decode([np.int64(108), 109]) == fastblt.decode(torch.tensor([108, 109])) == "hi"


@pytest.mark.parametrize("params", [dict(temperature=1e-38), dict(temperature=1e-300), dict(temperature=5e-324),
                                    dict(temperature=0.8, top_p=1e-46)])  # fmt: skip
def test_extreme_sampling_settings_sample_the_top_byte(params):
    """A temperature near 0, or top_p below float32's smallest number, leaves only the most likely
    byte (the greedy one), not a distribution of NaN."""
    g = torch_generator()
    want = g.generate(PROMPTS[0], mode="ar", max_bytes=12, stop_on_eos=False).ids
    assert g.generate(PROMPTS[0], mode="ar", max_bytes=12, stop_on_eos=False, seed=3, **params).ids == want


def test_load_takes_dtype_names():
    model = fastblt.load("default", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(InputError, match="dtype: expected one of"):
        fastblt.load("default", dtype="int8")


def test_a_request_built_by_hand_is_checked_like_a_made_one():
    """Requests from make_request are checked once; one built or replaced by hand is checked again
    when it runs (ids in the vocabulary, options resolved against the mode and checkpoint)."""
    g = torch_generator()
    made = make_request(PROMPTS[0], g.config, "blt-d", 12)
    by_hand = Request(made.ids, DecodeOptions(mode="blt-d", max_bytes=12))  # defaults left unresolved
    assert g.generate(by_hand).ids == g.generate(made).ids
    for ids in ((1, 999, 105), (1, 260)):  # 260 is the first id past the vocabulary (the [MASK] row)
        with pytest.raises(InputError, match=r"request ids: expected ints in \[0, 260\)"):
            g.generate(Request(ids, DecodeOptions(mode="ar", max_bytes=2)))
    assert len(g.generate(Request((1, 259), DecodeOptions(mode="ar", max_bytes=2, stop_on_eos=False))).ids) == 2
    with pytest.raises(InputError, match="option max_bytes"):
        g.generate(dataclasses.replace(made, opts=dataclasses.replace(made.opts, max_bytes=-5)))


def test_closing_waits_for_the_step_call_in_flight():
    """Engine.close (Generator.close) releases the backend only between step calls: a step running
    on another thread finishes on live sessions, then the backend is released."""
    from fastblt.engines.torch_backend import TorchBackend
    from fastblt.export.spec import step_specs

    model = tiny_model()
    running, release, events = threading.Event(), threading.Event(), []

    class Slow(TorchBackend):
        def _run_step_impl(self, step, feeds):
            if not running.is_set():
                running.set()
                release.wait(30)  # the first step call holds its lock until released
            out = super()._run_step_impl(step, feeds)
            events.append("step")
            return out

        def _deactivate_impl(self):
            events.append("released")
            super()._deactivate_impl()

    g = Generator(model, backend=Slow(step_specs(model.config), model))
    worker = threading.Thread(target=lambda: g.generate(PROMPTS[0], mode="ar", max_bytes=2))
    worker.start()
    assert running.wait(30)
    closer = threading.Thread(target=g.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive() and "released" not in events  # waiting for the step in flight
    release.set()
    closer.join(30)
    worker.join(30)
    assert events.index("released") > 0 and events[0] == "step"
