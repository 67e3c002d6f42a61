"""The trt backend: availability reporting, and its plumbing (engine checks, one context per
profile, profile selection, binding, caches written in place, buffer reuse, copies) over a fake
`tensorrt` on the CPU.

The fake engines execute the torch reference step on the memory at the addresses the backend
bound (an input bound at an output's address is updated in place, as TensorRT does with an
aliased buffer), so equality with the torch backend proves the binding, not TensorRT's numerics
(those are checked by scripts/gpu_check.sh and the gpu-marked test below, on a GPU with TensorRT).
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
from fastblt.errors import BackendUnavailable, InputError, InternalError, ManifestMismatch
from fastblt.export.spec import step_specs
from fastblt.validate.graphs import GraphRun, graph_parity, random_cases, random_feeds

from tiny import make_model

MACHINE = Machine("10.99.0", "Fake GPU", "9.0")
MAX_STEP = 24


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


def wire_fake(tmp_path, monkeypatch, model, max_step, profile, max_batch=2):
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
    _, specs = write_fake_export(art, model.config, max_step=max_step, max_batch=max_batch)
    trt_build.build_engines(art, profile=profile, max_batch=max_batch)
    return fake, art, specs


@pytest.fixture
def fake_env(tmp_path, monkeypatch, model):
    return wire_fake(tmp_path, monkeypatch, model, MAX_STEP, {"prefill": 16, "verify": 5})


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


def clones(feeds):
    return {k: v.clone() for k, v in feeds.items()}


def test_one_context_per_profile_and_binding_only_on_change(fake_env, model):
    _, art, specs = fake_env
    trt = trt_backend.TrtBackend(specs, art, device="cpu").activate()
    runner = trt.runners["encoder"]
    assert len(runner.contexts) == len(runner.profiles) == 4
    assert [c.profile for c in runner.contexts] == [0, 1, 2, 3]
    assert {c.strategy.name for c in runner.contexts} == {"ON_PROFILE_CHANGE"}  # memory per own profile
    feeds = random_feeds(specs["encoder"], model.config, [3], 1, seed=1)
    out1 = clones(trt.run_step("encoder", feeds))
    ctx = runner.contexts[0]
    calls = dict(ctx.calls)
    out2 = trt.run_step("encoder", feeds)  # same shapes, same buffers and caches: nothing to rebind
    assert ctx.calls["set_input_shape"] == calls["set_input_shape"]
    assert ctx.calls["set_tensor_address"] == calls["set_tensor_address"]
    assert ctx.calls["execute_async_v3"] == calls["execute_async_v3"] + 1
    assert all(torch.equal(out1[k], out2[k]) for k in out1)  # the same entries written again: same caches
    # outputs are tensors on the backend's device, owned by it (reused by the next call of the step) ...
    assert out2["h"].device == trt.device and out2["h"].data_ptr() == trt.run_step("encoder", feeds)["h"].data_ptr()
    # ... except the caches: each present.* is the caller's past.* itself, bound at its address
    for out, inp in specs["encoder"].aliases:
        assert out2[out] is feeds[inp] and ctx.addresses[out] == ctx.addresses[inp] == feeds[inp].data_ptr()
    assert not any(name.startswith("present.") for name in runner.device_buffers._store)  # no buffer of their own


def test_feeds_on_the_device_are_bound_in_place_and_others_copied(fake_env, model):
    """The runtime's caches live on the backend's device: binding them must not copy, and the
    step's new entries are written into them in place; a strided feed is copied."""
    _, art, specs = fake_env
    trt = trt_backend.TrtBackend(specs, art, device="cpu").activate()
    runner = trt.runners["decoder"]
    feeds = random_feeds(specs["decoder"], model.config, [5], 3, seed=2)
    before = clones(feeds)
    cache = feeds["past.0.k"]
    strided = feeds["h"].transpose(1, 2).contiguous().transpose(1, 2)  # same values, not contiguous
    assert not strided.is_contiguous()
    feeds["h"] = strided
    out = trt.run_step("decoder", feeds)
    (ctx,) = [c for c in runner.contexts if c.calls["execute_async_v3"]]
    addresses = ctx.addresses
    assert addresses["past.0.k"] == addresses["present.0.k"] == cache.data_ptr()  # in place, in and out
    assert addresses["cross.0.k"] == feeds["cross.0.k"].data_ptr()  # read where it is (the decoder only reads it)
    assert addresses["h"] != strided.data_ptr()  # copied into a contiguous buffer
    assert out["present.0.k"] is cache and not torch.equal(cache, before["past.0.k"])  # the caller's cache, written
    assert torch.equal(feeds["cross.0.k"], before["cross.0.k"])  # not aliased: never written
    with torch.no_grad():
        want = run_named_step(model, "decoder", before)
    assert all(torch.equal(out[k], want[k]) for k in want)


@pytest.mark.parametrize(
    ("step", "starts", "n"),
    [
        ("entropy", [0], 1),
        ("entropy", [1100], 5),  # the ring wraps: slots (p mod 536) written in place
        ("encoder", [3, 540], 16),  # batch 2, a row past one lap, the prefill profile
        ("global", [0], 4),
        ("global", [70, 300], 12),  # the linear cache and the cross ring (patch p in slot p mod 26)
        ("decoder", [536 * 2 + 7], 4),
        ("decoder_block", [9], 4),  # the diffusion head writes no cache
    ],
)
def test_aliased_caches_written_in_place_equal_the_torch_backends(fake_env, model, step, starts, n):
    """The trt backend writes each aliased cache (present.* into past.*, cross_present.* into
    cross.*) at the caller's address, with exactly the values the torch backend writes there."""
    _, art, specs = fake_env
    trt = trt_backend.TrtBackend(specs, art, device="cpu").activate()
    ref = TorchBackend(specs, model)
    feeds = random_feeds(specs[step], model.config, starts, n, seed=7)
    trt_feeds, ref_feeds = clones(feeds), clones(feeds)
    trt_out, ref_out = trt.run_step(step, trt_feeds), ref.run_step(step, ref_feeds)
    for out, inp in specs[step].aliases:
        assert trt_out[out] is trt_feeds[inp] and ref_out[out] is ref_feeds[inp]
        assert torch.equal(trt_feeds[inp], ref_feeds[inp]), f"{step}: {inp} written differently"
    written = [inp for _, inp in specs[step].aliases if not torch.equal(trt_feeds[inp], feeds[inp])]
    assert sorted(written) == sorted(inp for _, inp in specs[step].aliases)  # every aliased cache was written
    aliased = {inp for _, inp in specs[step].aliases}
    assert all(torch.equal(trt_feeds[k], feeds[k]) for k in feeds if k not in aliased)  # the rest only read
    assert all(torch.equal(trt_out[k], ref_out[k]) for k in ref_out)


def test_a_grown_global_cache_is_rebound_and_written_at_its_new_address(fake_env, model):
    """The runtime grows the global step's linear cache (`past` slots) by reallocating it: the
    backend binds the new buffer, as input and as the output written in place."""
    fake, art, specs = fake_env
    trt = trt_backend.TrtBackend(specs, art, device="cpu").activate()
    ref = TorchBackend(specs, model)
    runner = trt.runners["global"]
    for starts in ([10], [60], [200]):  # past 64, 128, 256
        feeds = random_feeds(specs["global"], model.config, starts, 4, seed=starts[0])
        trt_feeds, ref_feeds = clones(feeds), clones(feeds)
        trt.run_step("global", trt_feeds)
        ref.run_step("global", ref_feeds)
        step, i = fake.executed[-1]
        assert step == "global" and runner.profiles[i].name == "block"  # 4 patches, whatever `past`
        ctx = runner.contexts[i]
        assert ctx.shapes["past.0.k"][2] == trt_feeds["past.0.k"].shape[2]
        assert ctx.addresses["present.0.k"] == ctx.addresses["past.0.k"] == trt_feeds["past.0.k"].data_ptr()
        assert all(torch.equal(trt_feeds[k], ref_feeds[k]) for k in feeds)


def test_an_aliased_cache_must_be_contiguous_on_the_device(fake_env, model):
    """A cache written in place cannot be copied to a buffer (the write would miss the caller's
    memory): a strided one, or one on another device, is an InternalError before anything runs."""
    _, art, specs = fake_env
    trt = trt_backend.TrtBackend(specs, art, device="cpu").activate()
    runner = trt.runners["decoder"]
    feeds = random_feeds(specs["decoder"], model.config, [5], 3, seed=2)
    strided = dict(feeds, **{"past.0.v": feeds["past.0.v"].transpose(2, 3).contiguous().transpose(2, 3)})
    with pytest.raises(InternalError, match="input past.0.v: a cache written in place must be contiguous on cpu"):
        trt.run_step("decoder", strided)
    elsewhere = dict(feeds, **{"past.0.k": torch.empty_like(feeds["past.0.k"], device="meta")})
    with pytest.raises(
        InternalError, match="input past.0.k: a cache written in place must be contiguous on cpu, got a tensor on meta"
    ):
        trt.run_step("decoder", elsewhere)
    assert not any(c.calls["execute_async_v3"] for c in runner.contexts)
    assert not any(name.startswith("past.") for name in runner.device_buffers._store)  # never copied
    # cross.* is aliased only in the global step (cross_present.*): the decoder may read a strided one
    cross = feeds["cross.0.k"].transpose(2, 3).contiguous().transpose(2, 3)
    trt.run_step("decoder", dict(feeds, **{"cross.0.k": cross}))
    with pytest.raises(InternalError, match="input cross.0.k: a cache written in place must be contiguous"):
        trt.run_step(
            "global", dict(random_feeds(specs["global"], model.config, [0], 2, seed=0), **{"cross.0.k": cross})
        )


def test_buffers_grow_past_opt_and_outputs_stay_correct(fake_env, model):
    _, art, specs = fake_env
    trt = trt_backend.TrtBackend(specs, art, device="cpu").activate()
    runner = trt.runners["global"]
    grown = runner.device_buffers.grown
    feeds = random_feeds(specs["global"], model.config, [0, 2], 12, seed=3)  # batch 2, 12 patches > opt 4
    before = clones(feeds)
    out = trt.run_step("global", feeds)
    assert runner.device_buffers.grown > grown
    assert out["present.0.k"] is feeds["past.0.k"] and out["cross_present.0.k"] is feeds["cross.0.k"]
    with torch.no_grad():
        want = run_named_step(model, "global", before)
    assert all(torch.equal(out[k], want[k]) for k in want)


def test_sizes_outside_every_profile_are_an_input_error(fake_env, model):
    _, art, specs = fake_env
    trt = trt_backend.TrtBackend(specs, art, device="cpu").activate()
    feeds = random_feeds(specs["decoder_block"], model.config, [0], 5, seed=0)  # block profile: new <= 4
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
    specs = step_specs(model.config, MAX_STEP * 2)  # other rings: window + 48 slots
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
    report = e2e_parity(model, TorchBackend(specs, model), {"trt": trt}, prompts, E2ERun(max_bytes=12))
    assert report.compared > 0 and bool(report), report.failures()[:3]
    assert {k for k in report[("torch", "trt")]} == {"e2e/ar", "e2e/blt-s", "e2e/blt-d", "e2e/blt-dv"}


# ------------------------------------------------------------------------------ the real thing
@pytest.mark.gpu
def test_trt_backend_on_a_gpu(tmp_path, model):
    """Real TensorRT: build engines for a tiny export and compare every graph with torch (fp32)."""
    status = trt_build.trt_availability()
    if not status.available:
        pytest.skip(f"trt unavailable here: {status.reason}")
    from fastblt.export.exporter import export_model
    from fastblt.export.options import ExportOptions

    art = tmp_path / "art"
    export_model(model, art, ExportOptions(max_step=64, max_batch=2), checkpoint_hash="tiny")
    trt_build.build_engines(art, profile={"prefill": 16, "verify": 5}, max_batch=2)
    specs = step_specs(model.config, 64)
    report = graph_parity(
        random_cases(specs, model), TorchBackend(specs, model), {"trt": trt_backend.TrtBackend(specs, art)}, GraphRun()
    )
    assert report.compared > 0 and bool(report), report.failures()[:5]


def test_a_batch_engine_fits_its_rows_to_the_engines_profiles(fake_env, model):
    """Engines built for 2 rows serve a batch of 2 (each request as it runs alone on torch) and
    refuse a batch of 3 up front, saying how to rebuild."""
    from fastblt.runtime.batch import BatchEngine
    from fastblt.runtime.engine import Engine
    from fastblt.runtime.generator import Generator
    from fastblt.runtime.options import make_request

    _, art, specs = fake_env
    engine = Engine(trt_backend.TrtBackend(specs, art, device="cpu"), model.config)
    assert engine.backend.max_rows == 2
    with pytest.raises(InputError, match=r"max_batch 3: .* at most 2 rows .*`fastblt build --max-batch 3`"):
        BatchEngine(engine, max_batch=3)
    ref = Generator(model, backend=Engine(TorchBackend(specs, model), model.config))
    prompts = ["def main(", "import os", "x = 1"]
    with BatchEngine(engine) as batch:  # by default as wide as the engines allow
        assert batch.max_batch == 2
        tickets = [batch.submit(make_request(p, model.config, "ar", 10, stop_on_eos=False)) for p in prompts]
        got = [t.result(120).ids for t in tickets]
        assert batch.stats.rows["decoder"] > batch.stats.calls["decoder"]
    assert got == [ref.generate(p, mode="ar", max_bytes=10, stop_on_eos=False).ids for p in prompts]
