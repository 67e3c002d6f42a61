"""`attend`: training takes the fused kernel, inference and export the explicit fp32 path; same math."""

from __future__ import annotations

import torch

from fastblt.model.layers import NEG, attend


def _explicit(q, k, v, bias):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias
    return torch.softmax(scores, dim=-1) @ v


def test_training_path_matches_the_explicit_math_in_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    i = torch.arange(7)
    bias = torch.where((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 4), 0.0, NEG)[None, None]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    fused = attend(*leaves, bias)
    (fused * torch.arange(8.0)).sum().backward()
    refs = [t.clone().requires_grad_() for t in (q, k, v)]
    want = _explicit(*refs, bias)
    (want * torch.arange(8.0)).sum().backward()
    assert torch.allclose(fused, want, atol=1e-5)
    for a, b in zip(leaves, refs, strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(attend(q, k, v, bias), want, atol=1e-5)  # the inference path
