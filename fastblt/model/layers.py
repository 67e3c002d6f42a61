"""The building blocks shared by all four BLT stacks: RMSNorm, interleaved RoPE, masked attention,
SwiGLU, the pre-norm block and BLT's cross-attention (and the embedding table they start from).

Every function works on plain tensors so the same code serves the full forward, the incremental
step functions and the ONNX export. Attention logits, softmax, norms and RoPE run in fp32 whatever
the weight dtype (docs/architecture.md: precision lives in the graph). Masks are additive fp32 biases with a
large finite negative, never -inf, so a fully masked row gives a uniform average, not NaN.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

NEG = -1e9  # additive mask value: finite, far below any real logit


class Embedding(nn.Embedding):
    """nn.Embedding whose weight is left uninitialised on the meta device, where checkpoint loading
    builds the model: there `normal_` would import torch._dynamo (~0.8 s, once per process) for values
    nobody reads. Anywhere else it initialises as nn.Embedding does."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    """RMSNorm in fp32, cast back before the weight (as the HF port does)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


@functools.lru_cache(maxsize=64)
def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """theta^(-2j/hd) in float64, rounded once to fp32.

    A host constant, not graph ops: exporters fold `theta ** x` with their own pow, whose 1-ulp
    differences grow into visible angle errors at positions in the thousands.
    """
    return (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _inv_freq_on(head_dim: int, theta: float, device: torch.device) -> Tensor:
    """The same constant, copied to an accelerator once (a copy per call would also break CUDA graph capture)."""
    return torch.from_numpy(rope_inv_freq(head_dim, theta)).to(device)


def rope_angles(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables for integer positions (..., S) -> (..., S, head_dim/2), fp32."""
    if positions.device.type == "cpu":
        inv_freq = torch.from_numpy(rope_inv_freq(head_dim, float(theta)))
    else:
        inv_freq = _inv_freq_on(head_dim, float(theta), positions.device)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of x (B, H, S, hd) by cos/sin (B, S, hd/2)."""
    B, H, S, hd = x.shape
    xf = x.float().reshape(B, H, S, hd // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # (B, H, S, hd/2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, S, hd/2)
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)  # (B, H, S, hd/2, 2)
    return out.reshape(B, H, S, hd).to(x.dtype)


# The trainer's opt-in to the fused kernel without autograd (see fused_attention); a context
# variable, so one thread's training never changes another thread's inference.
_fused_without_grad: ContextVar[bool] = ContextVar("fused_without_grad", default=False)
# Attention dtypes that take the fused training path: fp32, and bf16 under the trainer's autocast
# (bf16 matrix products are ~4x faster than fp32 on CPUs with AVX512-BF16 or AMX).
TRAIN_DTYPES = (torch.float32, torch.bfloat16)


@contextmanager
def fused_attention() -> Iterator[None]:
    """Take the fused SDPA kernel without autograd too: the trainer's frozen entropy patcher, which
    is a quarter of a BLT-D training step on the explicit path. Its results differ from the explicit
    path's in the last bits (a borderline entropy can flip a patch boundary), so inference, export
    and evaluation never use it."""
    token = _fused_without_grad.set(True)
    try:
        yield
    finally:
        _fused_without_grad.reset(token)


BAND_ROWS = 128  # query rows per chunk of the banded training attention
# The last bias's key spans: every layer of a stack shares one bias, so they are found once per stack.
_spans_of: ContextVar[tuple[weakref.ref, int, list[tuple[int, int]]] | None] = ContextVar("spans_of", default=None)


def key_spans(bias: Tensor, rows: int = BAND_ROWS) -> list[tuple[int, int]]:
    """Per chunk of `rows` query rows, the key range [a, b) outside which every key is masked.

    A chunk holding a fully masked row gets all keys (such a row averages over every key). The
    spans of the last bias are kept while it lives: every layer of a stack shares one bias.
    """
    last = _spans_of.get()
    if last is not None and last[0]() is bias and last[1] == rows:
        return last[2]
    S, T = bias.shape[-2], bias.shape[-1]
    visible = (bias > NEG / 2).flatten(0, -3).any(0)  # (S, T)
    n = -(-S // rows)
    pad = n * rows - S
    seen = F.pad(visible, (0, 0, 0, pad)).view(n, rows, T)
    cols = seen.any(1)  # (n, T)
    blind = ~F.pad(visible.any(-1), (0, pad), value=True).view(n, rows).all(1)  # a fully masked row
    first = cols.int().argmax(1)
    last = T - cols.flip(1).int().argmax(1)
    spans = [
        (0, T) if f or b <= a else (a, b) for a, b, f in zip(first.tolist(), last.tolist(), blind.tolist(), strict=True)
    ]
    _spans_of.set((weakref.ref(bias), rows, spans))
    return spans


def banded_attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, rows: int = BAND_ROWS) -> Tensor:
    """The fused kernel per chunk of query rows over only the keys that chunk can see.

    Same values as one call (the skipped keys have weight exp(-1e9) = 0 in fp32); the saving is
    the masked part of the (S, T) scores: about half for a 512 window over 1025 bytes, and most
    of the encoder's patch cross-attention, where each slot sees only its patch's bytes.
    """
    n_q = q.shape[2]
    k, v = k.to(q.dtype), v.to(q.dtype)  # the kernel takes one dtype (autocast may leave them apart)
    if n_q < 2 * rows or bias.shape[-2] != n_q:  # short, or one bias row broadcast over every query
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
    outs = []
    for i, (a, b) in enumerate(key_spans(bias, rows)):
        r = slice(i * rows, min(n_q, (i + 1) * rows))
        m = bias[..., r, a:b].to(q.dtype)
        outs.append(F.scaled_dot_product_attention(q[:, :, r], k[:, :, a:b], v[:, :, a:b], attn_mask=m))
    return torch.cat(outs, dim=2)


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(hd) + bias) v with fp32 logits.

    q (B, H, S, hd), k/v (B, H, T, hd), bias fp32 broadcastable to (B, H, S, T) -> (B, H, S, hd).
    """
    if q.dtype in TRAIN_DTYPES and (_fused_without_grad.get() or (q.requires_grad and torch.is_grad_enabled())):
        # training: the fused kernel keeps no (S, T) probabilities for backward (3x faster on CPU
        # at 1152 positions), banded so that masked keys cost nothing; same math, in fp32 or, under
        # the trainer's bf16 autocast, in bf16. Inference and export take the path below.
        return banded_attend(q, k, v, bias)
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale + bias
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """(B, S, H*hd) -> (B, H, S, hd)"""
    B, S, D = x.shape
    return x.view(B, S, n_heads, D // n_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, S, hd) -> (B, S, H*hd)"""
    B, H, S, hd = x.shape
    return x.transpose(1, 2).reshape(B, S, H * hd)


class KVCache(Protocol):
    """Where a cached step's keys and values go (model/steps.py): given this call's keys and
    values (B, H, S, hd), returns the keys and values attention reads (B, H, T, hd) - e.g. the
    whole ring after writing them in place, or the cache followed by them, unwritten."""

    def __call__(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...


class Attention(nn.Module):
    """Multi-head self-attention with RoPE; caches are arguments, never state."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, cache: KVCache | None = None) -> Tensor:
        """x (B, S, D) -> (B, S, D); bias over the keys the cache gives (its slots, or just these S)."""
        q = apply_rope(split_heads(self.wq(x), self.n_heads), cos, sin)
        k = apply_rope(split_heads(self.wk(x), self.n_heads), cos, sin)
        v = split_heads(self.wv(x), self.n_heads)
        keys, values = (k, v) if cache is None else cache(k, v)  # (B, H, T, hd)
        return self.wo(merge_heads(attend(q, keys, values, bias)))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, dim: int, n_heads: int, ffn_dim: int, eps: float):
        super().__init__()
        self.attention = Attention(dim, n_heads)
        self.feed_forward = FeedForward(dim, ffn_dim)
        self.attention_norm = RMSNorm(dim, eps)
        self.ffn_norm = RMSNorm(dim, eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, cache: KVCache | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, bias, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class CrossAttention(nn.Module):
    """BLT cross-attention: q from norm_q(x), k/v from norm_kv(kv); returns x + attn (no RoPE).

    Callers add x once more, which gives the released models' doubled residual 2x + attn.
    """

    def __init__(self, dim: int, n_heads: int, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.cross_attn_norm_q = RMSNorm(dim, eps)
        self.cross_attn_norm_kv = RMSNorm(dim, eps)

    def keys_values(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        """(..., T, D) -> keys and values (..., T, D), not yet split into heads."""
        kv = self.cross_attn_norm_kv(kv)
        return self.wk(kv), self.wv(kv)

    def forward(self, x: Tensor, keys: Tensor, values: Tensor, bias: Tensor) -> Tensor:
        """x (B, S, D); keys/values (B, T, D); bias broadcastable to (B, H, S, T)."""
        q = split_heads(self.wq(self.cross_attn_norm_q(x)), self.n_heads)
        out = attend(q, split_heads(keys, self.n_heads), split_heads(values, self.n_heads), bias)
        return x + self.wo(merge_heads(out))

    def forward_slots(self, x: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """Each position reads its own k slots: x (B, S, D), keys/values (B, S, k, D) -> (B, S, D)."""
        B, S, D = x.shape
        hd = D // self.n_heads
        q = self.wq(self.cross_attn_norm_q(x)).view(B, S, self.n_heads, 1, hd)  # (B, S, H, 1, hd)
        kh = keys.view(B, S, -1, self.n_heads, hd).transpose(2, 3)  # (B, S, H, k, hd)
        vh = values.view(B, S, -1, self.n_heads, hd).transpose(2, 3)
        scores = torch.matmul(q, kh.transpose(-1, -2)).float() * hd**-0.5  # (B, S, H, 1, k)
        out = torch.matmul(torch.softmax(scores, dim=-1).to(vh.dtype), vh)  # (B, S, H, 1, hd)
        return x + self.wo(out.reshape(B, S, D))


def self_attention_bias(
    q_pos: Tensor, k_pos: Tensor, k_valid: Tensor, window: int | None, causal: bool = True
) -> Tensor:
    """Additive bias (B, 1, S, T): key j is visible to query i if valid, j <= i and i - j < window.

    q_pos (B, S), k_pos (B, T) integer positions; k_valid (B, T) bool.
    """
    qp, kp = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)  # (B, S, 1), (B, 1, T)
    ok = k_valid.unsqueeze(-2)
    if causal:
        ok = ok & (kp <= qp)
    if window is not None:
        ok = ok & (qp - kp < window)
    return torch.where(ok, 0.0, NEG).unsqueeze(1).to(torch.float32)
