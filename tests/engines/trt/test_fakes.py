"""The fakes themselves: they lack what TensorRT 11 removed, read/write real memory and update an
input bound at an output's address in place, as TensorRT does."""

from __future__ import annotations

import torch
from trt_fakes import FakeEngine, make_fake_trt, tensor_at


def test_fake_flavors_mirror_the_removed_api():
    """The TRT-11 flavor lacks exactly what TensorRT 11 removed, so code touching it would fail."""
    t10, t11 = make_fake_trt("10"), make_fake_trt("11")
    assert hasattr(t10.BuilderFlag, "FP16") and hasattr(t10.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    for name in ("FP16", "BF16", "INT8"):
        assert not hasattr(t11.BuilderFlag, name)
    assert not hasattr(t11.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")


def test_tensor_at_reads_and_writes_the_memory_at_an_address():
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    view = tensor_at(x.data_ptr(), (2, 3), torch.float32)
    assert torch.equal(view, x)
    view.fill_(7.0)
    assert bool((x == 7.0).all())


def _engine(trt, shape=(2, 3)):
    """A fake engine of one step "s": x (read only) and cache in; y and cache_out out."""
    t = {"dtype": "float32", "shape": list(shape)}
    io = [({"name": n, **t}, True) for n in ("x", "cache")] + [({"name": n, **t}, False) for n in ("y", "cache_out")]
    profile = {n: (shape, shape, shape) for n in ("x", "cache")}
    return FakeEngine(trt, {"io": io, "profiles": [profile], "source": "s.onnx"})


def _run(ctx, addresses, shape=(2, 3)):
    ctx.set_optimization_profile_async(0, 0)
    for name in ("x", "cache"):
        assert ctx.set_input_shape(name, shape)
    for name, ptr in addresses.items():
        ctx.set_tensor_address(name, ptr)
    assert ctx.execute_async_v3(0)


def in_place_step(step, feeds):
    """What the reference steps do: update the cache in place and return it as the output."""
    feeds["cache"].add_(feeds["x"])
    feeds["x"].mul_(0.0)  # a misbehaving write to a read-only input: must never reach its memory
    return {"y": feeds["x"] + 1.0, "cache_out": feeds["cache"]}


def test_an_input_and_output_at_one_address_are_updated_in_place():
    """Bound at one address, cache and cache_out are one buffer (as in TensorRT): the executor's
    in-place update lands in the caller's memory; an input at an address of its own is a copy."""
    trt = make_fake_trt()
    trt.executor = in_place_step
    x, cache, y = torch.ones(2, 3), torch.arange(6.0).view(2, 3), torch.empty(2, 3)
    want = cache + 1.0
    _run(
        _engine(trt).create_execution_context(),
        {"x": x.data_ptr(), "cache": cache.data_ptr(), "y": y.data_ptr(), "cache_out": cache.data_ptr()},
    )
    assert torch.equal(cache, want) and torch.equal(x, torch.ones(2, 3)) and torch.equal(y, torch.ones(2, 3))


def test_an_output_at_an_address_of_its_own_leaves_the_input_unchanged():
    """Not aliased: the engine reads the cache and writes the result to cache_out's own memory."""
    trt = make_fake_trt()
    trt.executor = in_place_step
    x, cache, y, out = torch.ones(2, 3), torch.arange(6.0).view(2, 3), torch.empty(2, 3), torch.empty(2, 3)
    before = cache.clone()
    addresses = {"x": x.data_ptr(), "cache": cache.data_ptr(), "y": y.data_ptr(), "cache_out": out.data_ptr()}
    _run(_engine(trt).create_execution_context(), addresses)
    assert torch.equal(cache, before) and torch.equal(out, before + 1.0)
