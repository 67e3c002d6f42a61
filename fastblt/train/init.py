"""Weight initialisation for training from scratch (loading a checkpoint never calls this).

PyTorch's defaults are badly scaled for these models: `nn.Embedding` draws N(0, 1), so the byte
plus six hash n-gram embeddings start with an RMS of ~2.6 per element, and the encoder's patch
slots that feed the global transformer grow to an RMS of 20-50 in training while each global
layer adds ~1. The global stream is then its input plus small corrections, and the decoder
learns to ignore it (a default trained with PyTorch's init ended with the decoder's key/value
norm weights shrunk to ~0.03). Meta's BLT code (after Meta lingua) initialises every matrix from a truncated
normal with std = fan_in^-1/2 (embeddings: dim^-1/2), and divides the residual output
projections by sqrt(2 (depth + 1)); this module does the same for every stack here.
"""

from __future__ import annotations

import math

from torch import nn

from fastblt.model.layers import Attention, CrossAttention, FeedForward


def _trunc_normal(weight, std: float) -> None:
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


def _depth_of(name: str) -> int:
    """The layer index in a module name such as `local_decoder.layers.1.attention` (0 if none)."""
    parts = name.split(".")
    for a, b in zip(parts, parts[1:], strict=False):
        if a in ("layers", "cross_attn_layers") and b.isdigit():
            return int(b)
    return 0


def init_weights(model: nn.Module) -> nn.Module:
    """Initialise `model` in place (a BltModel, an EntropyModel or any stack of our layers)."""
    for name, module in model.named_modules():
        depth_factor = math.sqrt(2 * (_depth_of(name) + 1))
        if isinstance(module, nn.Embedding):
            _trunc_normal(module.weight, module.embedding_dim**-0.5)
        elif isinstance(module, Attention | CrossAttention):
            for w in (module.wq, module.wk, module.wv):
                _trunc_normal(w.weight, w.in_features**-0.5)
            _trunc_normal(module.wo.weight, module.wo.in_features**-0.5 / depth_factor)
        elif isinstance(module, FeedForward):
            for w in (module.w1, module.w3):
                _trunc_normal(w.weight, w.in_features**-0.5)
            _trunc_normal(module.w2.weight, module.w2.in_features**-0.5 / depth_factor)
    # every other matrix (patch projections, output heads): std = fan_in^-1/2
    owned = {
        id(p)
        for m in model.modules()
        if isinstance(m, Attention | CrossAttention | FeedForward)
        for p in m.parameters()
    }
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in owned:
            _trunc_normal(module.weight, module.in_features**-0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model
