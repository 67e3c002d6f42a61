"""`attend`: training (and the trainer's frozen patcher) takes the fused kernel, inference and export
the explicit fp32 path; same math."""

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


def test_fused_attention_context_takes_the_kernel_without_grad_and_only_inside(monkeypatch):
    from fastblt.model import layers

    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g) for _ in range(3))
    bias = torch.zeros(1, 1, 5, 5)
    with torch.no_grad():
        plain = attend(q, k, v, bias)
        assert calls == []
        with layers.fused_attention():
            fused = attend(q, k, v, bias)
        assert calls == [1]
        try:
            with layers.fused_attention():
                raise RuntimeError
        except RuntimeError:
            pass
        attend(q, k, v, bias)
    assert calls == [1]  # the explicit path again after the block, even one left by an exception
    assert torch.allclose(plain, fused, atol=1e-5)


def test_the_trainers_fused_patcher_cuts_the_same_patches_as_the_exact_one():
    from fastblt.formats.checkpoint import load_checkpoint
    from fastblt.train.blt_d import patch_batch
    from fastblt.train.corpus import Corpus

    model = load_checkpoint("default").eval()
    x = Corpus.load(limit_bytes=100_000).sample(2, 512, torch.Generator().manual_seed(0))
    exact, fused = patch_batch(model, x), patch_batch(model, x, fused=True)
    assert exact.shape[0] == 2 and (exact > 0).sum() > 100  # ~4-byte patches
    assert torch.equal(exact, fused)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's bf16 steps patch in fp32
        assert torch.equal(exact, patch_batch(model, x, fused=True))


def _window_bias(n: int, window: int) -> torch.Tensor:
    i = torch.arange(n)
    return torch.where((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window), 0.0, NEG)[None, None]


def test_banded_attention_equals_one_kernel_call_in_values_and_gradients():
    """Windowed, block-diagonal (the encoder's patch slots) and with a fully masked row (a padded patch)."""
    from fastblt.model.layers import banded_attend

    g = torch.Generator().manual_seed(2)
    n = 300
    block = torch.where(torch.arange(n)[:, None] // 5 == torch.arange(n)[None, :] // 7, 0.0, NEG)[None, None]
    blind = block.clone()
    blind[..., 290, :] = NEG
    row = torch.where(torch.arange(n) % 3 == 0, 0.0, NEG).view(1, 1, 1, n)  # one row broadcast over queries
    for bias in (_window_bias(n, 64).expand(2, 1, n, n), block, blind, row):
        q, k, v = (torch.randn(2, 3, n, 8, generator=g) for _ in range(3))
        a = [t.clone().requires_grad_() for t in (q, k, v)]
        b = [t.clone().requires_grad_() for t in (q, k, v)]
        out = banded_attend(*a, bias, rows=32)
        want = torch.nn.functional.scaled_dot_product_attention(*b, attn_mask=bias)
        w = torch.randn(out.shape, generator=g)
        (out * w).sum().backward()
        (want * w).sum().backward()
        assert torch.allclose(out, want, atol=1e-5)
        for x, y in zip(a, b, strict=True):
            assert torch.allclose(x.grad, y.grad, atol=1e-5)


def test_key_spans_skip_only_masked_keys():
    from fastblt.model.layers import key_spans

    bias = _window_bias(200, 50)
    spans = key_spans(bias, rows=40)
    assert len(spans) == 5 and spans[0] == (0, 40) and spans[4] == (160 - 49, 200)
    for i, (a, b) in enumerate(spans):
        rows = bias[0, 0, 40 * i : 40 * (i + 1)]
        assert bool((rows[:, :a] == NEG).all()) and bool((rows[:, b:] == NEG).all())
        assert bool((rows[:, a] == 0).any()) and bool((rows[:, b - 1] == 0).any())
    blind = bias.clone()
    blind[..., 130, :] = NEG  # a row that sees nothing averages over every key: its chunk keeps them all
    assert key_spans(blind, rows=40)[3] == (0, 200)


def test_bf16_autocast_training_takes_the_kernel_and_stays_near_fp32(monkeypatch):
    """The trainer's bf16 autocast: bf16 q/k/v with the fp32 bias go through the fused kernel."""
    from fastblt.model import layers

    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 300, 16, generator=g) for _ in range(3))
    bias = _window_bias(300, 64)
    leaves = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    out = attend(*leaves, bias)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and len(calls) == 3  # banded: 300 rows in chunks of 128
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in leaves)
    want = _explicit(q, k, v, bias)
    assert (out.float() - want).abs().max() < 0.05  # bf16 rounding, not a different computation
    assert (out.float() - want).abs().max() > 1e-6  # and it did run in bf16
