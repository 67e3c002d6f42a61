"""Devices: the runtime keeps its caches where the backend computes.

On the CPU: device arguments are checked up front and never move the caller's model. With
`-m gpu` on a CUDA machine: a torch backend on the GPU keeps every cache there and generates
what the CPU generates, byte for byte, in every mode; `fastblt validate --device cuda` passes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from runtime_refs import PROMPTS, tiny_model

from fastblt.engines.base import resolve_device
from fastblt.engines.torch_backend import TorchBackend
from fastblt.errors import InputError
from fastblt.export.spec import step_specs
from fastblt.runtime.generator import Generator
from fastblt.runtime.state import SequenceState

MODES = ("ar", "blt-s", "blt-d", "blt-dv")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.mark.parametrize(
    "device, match",
    [
        ("gpu", "device 'gpu': not a torch device"),
        ("mps", "device 'mps': fastblt runs on cpu or cuda"),
        ("cuda:99", "device 'cuda:99': "),
    ],
)
def test_bad_devices_are_named(device, match):
    with pytest.raises(InputError, match=match):
        resolve_device(device)
    with pytest.raises(InputError, match=match):
        Generator(tiny_model(), backend="torch", max_context=64, device=device)


def test_cuda_graphs_are_a_torch_option():
    with pytest.raises(InputError, match="cuda_graphs: a torch backend option"):
        Generator(tiny_model(), backend="ort", max_context=64, cuda_graphs=True)


def test_ort_does_not_take_a_gpu_device():
    dev = "cuda" if torch.cuda.is_available() else "cuda:0"
    with pytest.raises(InputError, match="device 'cuda.*"):
        Generator(tiny_model(), backend="ort", max_context=64, device=dev)


def test_a_device_copy_leaves_the_callers_model_alone():
    model = tiny_model()
    specs = step_specs(model.config, 32, 32)
    backend = TorchBackend(specs, model, device="cpu")
    assert backend.model is model  # already there: no copy
    assert backend.device == next(model.parameters()).device


def state_buffers(state: SequenceState) -> list[torch.Tensor]:
    """Every buffer a sequence keeps: byte states, rings, linear caches, the cross ring."""
    caches = [*state.rows.rings.values(), *(c.kv for c in state.linear.values()), state.rows.cross]
    return [state.h, *(t for kv in caches for pair in kv for t in pair)]


def test_state_buffers_live_on_the_backend_device():
    model = tiny_model()
    backend = TorchBackend(step_specs(model.config), model, device="cpu")
    state = SequenceState(backend, model.config)
    buffers = state_buffers(state)
    assert {b.device for b in buffers} == {backend.device}
    logits = state.run(state.append([1, 72, 105]))
    assert isinstance(logits, np.ndarray) and logits.shape == (3, model.config.vocab_size)  # on the host


# ------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
@needs_cuda
def test_cuda_state_keeps_every_buffer_on_the_gpu():
    model = tiny_model()
    backend = TorchBackend(step_specs(model.config), model, device="cuda")
    assert next(model.parameters()).device.type == "cpu"  # the caller's model did not move
    state = SequenceState(backend, model.config)
    buffers = state_buffers(state)
    assert {b.device.type for b in buffers} == {"cuda"}
    cpu = SequenceState(TorchBackend(step_specs(model.config), model), model.config)
    ids = [1, *b"def main(argv):"]
    np.testing.assert_allclose(state.run(state.append(ids)), cpu.run(cpu.append(ids)), atol=1e-4, rtol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("graphs", [True, False], ids=["cuda-graphs", "eager"])
@pytest.mark.parametrize("mode", MODES)
def test_greedy_generation_on_cuda_equals_cpu(mode, graphs):
    model = tiny_model()
    on_cpu = Generator(model, backend="torch", max_context=256)
    on_gpu = Generator(model, backend="torch", max_context=256, device="cuda", cuda_graphs=graphs)
    assert on_gpu.device.type == "cuda"
    for prompt in PROMPTS[:4]:
        want = on_cpu.generate(prompt, mode=mode, max_bytes=24, stop_on_eos=False)
        got = on_gpu.generate(prompt, mode=mode, max_bytes=24, stop_on_eos=False)
        assert got.ids == want.ids, (mode, prompt)
    cache = on_gpu.engine.backend.graphs
    if graphs:
        assert cache.captures > 0 and cache.replays > cache.captures  # the graphs ran, and were reused
    else:
        assert cache is None


@pytest.mark.gpu
@needs_cuda
def test_validate_on_cuda_passes(tmp_path):
    from fastblt.validate.run import ValidateOptions, validate

    opts = ValidateOptions(backends=("torch",), device="cuda", max_bytes=16, cache_dir=tmp_path)
    report = validate(opts, model=tiny_model())
    assert report.compared > 0 and bool(report), report.failures()[:5]
    assert any(name.startswith("torch@cuda") for name in report.meta["backends_run"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the device is not missing")
def test_a_missing_cuda_device_exits_3_as_an_unavailable_backend(monkeypatch, capsys):
    from tiny import run_cli

    code, _, err = run_cli(["generate", "--prompt", "x", "--backend", "torch", "--device", "cuda"], monkeypatch, capsys)
    assert code == 3 and "CUDA is not available here" in err


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", MODES)
def test_prompt_snapshots_on_cuda_stay_on_the_gpu_and_compute_the_same(mode):
    """A snapshot of a sequence on the GPU is kept in GPU memory, and a prompt sent again loads it
    there and generates what a GPU Generator without snapshots does."""
    from fastblt.model.tokenizer import encode
    from fastblt.runtime.prompt_cache import prompt_keys

    model = tiny_model()
    plain = Generator(model, backend="torch", max_context=1024, device="cuda", prompt_cache_mb=0)
    cached = Generator(model, backend="torch", max_context=1024, device="cuda")
    prompt = (PROMPTS[5] * 4).encode()  # kept at 256 and at its cut
    for _ in range(2):
        got = cached.generate(prompt, mode=mode, max_bytes=24, stop_on_eos=False)
        assert got.ids == plain.generate(prompt, mode=mode, max_bytes=24, stop_on_eos=False).ids
    assert got.stats.prompt_cached > 0
    kept = cached.engine.prompts.peek(prompt_keys(encode(prompt), cached.engine.max_step)[0][1])
    assert {t.device.type for t in [*kept.snap.rows, kept.snap.h]} == {"cuda"}
