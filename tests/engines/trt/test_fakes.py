"""The fakes themselves: they lack what TensorRT 11 removed and read/write real memory."""

from __future__ import annotations

import torch
from trt_fakes import make_fake_trt, tensor_at


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
