"""The trt backend: availability reporting, and its plumbing (engine checks, one context per
profile, profile selection, binding, buffer reuse, copies) over a fake `tensorrt` on the CPU.

The fake engines execute the torch reference step on the memory at the addresses the backend
bound, so equality with the torch backend proves the binding, not TensorRT's numerics (those
are checked by scripts/gpu_check.sh and the gpu-marked test below, on a GPU with TensorRT).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch
from trt_fakes import make_fake_trt, write_fake_export

from fastblt.engines.registry import available, backend_factory
from fastblt.engines.torch_backend import TorchBackend, run_named_step
from fastblt.engines.trt import backend as trt_backend
from fastblt.engines.trt import build as trt_build
from fastblt.engines.trt.engine_cache import Machine
from fastblt.errors import BackendUnavailable, InputError, ManifestMismatch
from fastblt.export.spec import step_specs
from fastblt.validate.graphs import GraphRun, graph_parity, random_cases, random_feeds

from tiny import make_model

MACHINE = Machine("10.99.0", "Fake GPU", "9.0")
CAPACITY = 24


# ------------------------------------------------------------------------------ availability
def test_module_imports_without_tensorrt():
    code = "import sys, fastblt.engines.trt.backend, fastblt.cli.build; print('tensorrt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unavailable_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    status = available()["trt"]
    assert not status.available
    assert status.reason == trt_build.NOT_INSTALLED
    assert "pip install tensorrt --extra-index-url https://pypi.nvidia.com" in status.reason
    with pytest.raises(BackendUnavailable, match="backend trt: unavailable here: tensorrt is not installed"):
        backend_factory("trt")


def test_unavailable_without_cuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status = available()["trt"]
    assert (status.available, status.reason) == (False, "no CUDA device (torch.cuda.is_available() is False)")
    with pytest.raises(BackendUnavailable, match=r"no CUDA device \(torch.cuda.is_available\(\) is False\)"):
        backend_factory("trt")


def test_broken_tensorrt_install_is_reported(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kw):
        if name == "tensorrt":
            raise ImportError("libnvinfer.so.11: cannot open shared object file")
        return real_import(name, *args, **kw)

    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    status = trt_build.trt_availability()
    assert not status.available and "tensorrt cannot be imported: libnvinfer.so.11" in status.reason


def test_available_with_tensorrt_and_cuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(version="11.4.0.106"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    status = trt_build.trt_availability()
    assert status.available and status.reason == "TensorRT 11.4.0.106 on NVIDIA H100 80GB HBM3 (sm 9.0)"


# ------------------------------------------------------------------------------ plumbing on a fake
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: threads only add contention on a shared CPU (10x slower with 2 busy cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return make_model("hf-test-sizes")


def wire_fake(tmp_path, monkeypatch, model, capacity, profile, max_batch=2):
    """An export + engines built by the fake, and the backend wired to run on the CPU."""
    fake = make_fake_trt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_build, "current_machine", lambda device=None: MACHINE)
    monkeypatch.setattr(trt_backend, "current_machine", lambda device=None: MACHINE)
    monkeypatch.setattr(trt_backend, "require_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_backend, "_cuda_stream", lambda device: (0, contextlib.nullcontext, lambda: None))

    def executor(step, feeds):
        with torch.no_grad():
            return run_named_step(model, step, feeds)

    fake.executor = executor
    art = tmp_path / "art"
    _, specs = write_fake_export(art, model.config, capacity=capacity, max_batch=max_batch)
    trt_build.build_engines(art, profile=profile, max_batch=max_batch)
    return fake, art, specs


@pytest.fixture
def fake_env(tmp_path, monkeypatch, model):
    return wire_fake(tmp_path, monkeypatch, model, CAPACITY, {"prefill": 16, "verify": 5})


def test_backend_matches_torch_on_every_graph(fake_env, model):
    fake, art, specs = fake_env
    trt = trt_backend.TrtBackend(specs, art, device="cpu").activate()
    ref = TorchBackend(specs, model)
    byte_steps = ("entropy", "encoder", "global", "decoder")
    cases = random_cases(specs, model, chunk_sizes=(1, 2, 4, 5, 16), steps=byte_steps)
    cases += random_cases(specs, model, chunk_sizes=(1, 2, 4), steps=("decoder_block",))  # blocks: B = 4
    report = graph_parity(cases, ref, {"trt": trt}, GraphRun())
    assert report.compared > 0 and bool(report), report.failures()[:3]
    # the contexts that ran: decode for S=1, the block profile for S<=4, verify for 5, prefill for 16
    ran = {(step, trt.runners[step].profiles[i].name) for step, i in fake.executed}
    assert {("decoder", "decode"), ("decoder", "block"), ("decoder", "verify"), ("decoder", "prefill")} <= ran
    assert {("decoder_block", "block")} <= ran


def test_one_context_per_profile_and_binding_only_on_change(fake_env, model):
    _, art, specs = fake_env
    trt = trt_backend.TrtBackend(specs, art, device="cpu").activate()
    runner = trt.runners["encoder"]
    assert len(runner.contexts) == len(runner.profiles) == 4
    assert [c.profile for c in runner.contexts] == [0, 1, 2, 3]
    assert {c.strategy.name for c in runner.contexts} == {"ON_PROFILE_CHANGE"}  # memory per own profile
    feeds = random_feeds(specs["encoder"], model, [3], 1, seed=1)
    out1 = {k: v.clone() for k, v in trt.run_step("encoder", feeds).items()}
    ctx = runner.contexts[0]
    calls = dict(ctx.calls)
    out2 = trt.run_step("encoder", feeds)  # same shapes, same buffers: nothing to rebind
    assert ctx.calls["set_input_shape"] == calls["set_input_shape"]
    assert ctx.calls["set_tensor_address"] == calls["set_tensor_address"]
    assert ctx.calls["execute_async_v3"] == calls["execute_async_v3"] + 1
    assert all(torch.equal(out1[k], out2[k]) for k in out1)
    # outputs are tensors on the backend's device, owned by it (reused by the next call of the step)
    assert out2["h"].device == trt.device and out2["h"].data_ptr() == trt.run_step("encoder", feeds)["h"].data_ptr()


def test_feeds_on_the_device_are_bound_in_place_and_others_copied(fake_env, model):
    """The runtime's static caches live on the backend's device: binding them must not copy."""
    _, art, specs = fake_env
    trt = trt_backend.TrtBackend(specs, art, device="cpu").activate()
    runner = trt.runners["decoder"]
    feeds = random_feeds(specs["decoder"], model, [5], 3, seed=2)
    cache = feeds["past.0.k"]
    strided = feeds["h"].transpose(1, 2).contiguous().transpose(1, 2)  # same values, not contiguous
    assert not strided.is_contiguous()
    feeds["h"] = strided
    out = {k: v.clone() for k, v in trt.run_step("decoder", feeds).items()}
    (ctx,) = [c for c in runner.contexts if c.calls["execute_async_v3"]]
    addresses = ctx.addresses
    assert addresses["past.0.k"] == cache.data_ptr()  # in place
    assert addresses["h"] != strided.data_ptr()  # copied into a contiguous buffer
    with torch.no_grad():
        want = run_named_step(model, "decoder", {**feeds, "h": strided.contiguous()})
    assert all(torch.equal(out[k], want[k]) for k in want)


def test_buffers_grow_past_opt_and_outputs_stay_correct(fake_env, model):
    _, art, specs = fake_env
    trt = trt_backend.TrtBackend(specs, art, device="cpu").activate()
    runner = trt.runners["global"]
    grown = runner.device_buffers.grown
    feeds = random_feeds(specs["global"], model, [0, 2], 12, seed=3)  # batch 2, 12 patches > opt 4
    out = trt.run_step("global", feeds)
    assert runner.device_buffers.grown > grown
    with torch.no_grad():
        want = run_named_step(model, "global", feeds)
    assert all(torch.equal(out[k], want[k]) for k in want)


def test_sizes_outside_every_profile_are_an_input_error(fake_env, model):
    _, art, specs = fake_env
    trt = trt_backend.TrtBackend(specs, art, device="cpu").activate()
    feeds = random_feeds(specs["decoder_block"], model, [0], 5, seed=0)  # block profile: new <= 4
    with pytest.raises(InputError, match="step decoder_block: sizes .* fit none of the engine's profiles"):
        trt.run_step("decoder_block", feeds)


def test_foreign_engines_are_refused_before_deserializing(fake_env, monkeypatch):
    fake, art, specs = fake_env
    other = Machine("10.99.0", "Another GPU", "8.0")
    monkeypatch.setattr(trt_backend, "current_machine", lambda device=0: other)
    before = fake.log.count(("deserialize_cuda_engine",))
    with pytest.raises(ManifestMismatch, match="field gpu_name differs.*rebuild with: fastblt build --artifacts"):
        trt_backend.TrtBackend(specs, art, device="cpu").activate()
    assert fake.log.count(("deserialize_cuda_engine",)) == before


def test_an_input_that_became_a_shape_tensor_is_refused(fake_env):
    fake, art, specs = fake_env
    fake.shape_tensors.add("start")
    with pytest.raises(ManifestMismatch, match="input start: TensorRT made it a shape tensor"):
        trt_backend.TrtBackend(specs, art, device="cpu").activate()


def test_specs_that_differ_from_the_export_are_refused(fake_env, model):
    _, art, _ = fake_env
    specs = step_specs(model.config, CAPACITY * 2, CAPACITY * 2)
    with pytest.raises(ManifestMismatch, match="past.0.k"):
        trt_backend.TrtBackend(specs, art, device="cpu").activate()


def test_missing_engines_say_how_to_build_them(fake_env):
    _, art, specs = fake_env
    with pytest.raises(ManifestMismatch, match="no engine; rebuild with: fastblt build --artifacts .* --engines"):
        trt_backend.TrtBackend(specs, art, engines_dir=art / "elsewhere", device="cpu").activate()


def test_greedy_generation_in_every_mode_matches_torch(tmp_path, monkeypatch, model):
    """The runtime's real call pattern (prefill chunks, decode, k+1 verify, diffusion blocks and
    their commits, rollbacks) through the trt backend's plumbing, byte for byte against torch."""
    from fastblt.validate.e2e import E2ERun, e2e_parity

    _, art, specs = wire_fake(tmp_path, monkeypatch, model, 64, {}, max_batch=1)
    trt = trt_backend.TrtBackend(specs, art, device="cpu")
    prompts = ["def main(argv=None):", "import os"]
    report = e2e_parity(model, TorchBackend(specs, model), {"trt": trt}, prompts, 64, 64, E2ERun(max_bytes=12))
    assert report.compared > 0 and bool(report), report.failures()[:3]
    assert {k for k in report[("torch", "trt")]} == {"e2e/ar", "e2e/blt-s", "e2e/blt-d", "e2e/blt-dv"}


# ------------------------------------------------------------------------------ the real thing
@pytest.mark.gpu
def test_trt_backend_on_a_gpu(tmp_path, model):
    """Real TensorRT: build engines for a tiny export and compare every graph with torch (fp32)."""
    status = trt_build.trt_availability()
    if not status.available:
        pytest.skip(f"trt unavailable here: {status.reason}")
    from fastblt.export.exporter import ExportOptions, export_model

    art = tmp_path / "art"
    export_model(model, art, ExportOptions(capacity=64, max_batch=2), checkpoint_hash="tiny")
    trt_build.build_engines(art, profile={"prefill": 16, "verify": 5}, max_batch=2)
    specs = step_specs(model.config, 64, 64)
    report = graph_parity(
        random_cases(specs, model), TorchBackend(specs, model), {"trt": trt_backend.TrtBackend(specs, art)}, GraphRun()
    )
    assert report.compared > 0 and bool(report), report.failures()[:5]
