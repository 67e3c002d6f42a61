"""The five incremental step functions: the contract between export, engines and runtime.

Each step consumes S >= 1 new positions plus caches and returns outputs for those positions plus
the cache entries they produced. Caches are static-capacity buffers owned by the caller:
`past` holds C slots per layer (slot j = position j), `start` (B,) says how many are valid, and the
step returns only the S new entries (B, H, S, hd), which the caller writes at slots
start..start+S-1. Rolling back is moving `start` back; stale slots are masked, then overwritten.
The same function serves prefill (S large), decode (S = 1), verification (S = k+1) and, for the
block step, diffusion blocks (S = B).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastblt.model.blt import BltModel, EntropyModel, run_layers
from fastblt.model.layers import NEG, self_attention_bias
from fastblt.model.patching import entropy

KV = list[tuple[Tensor, Tensor]]


def cached_bias(start: Tensor, S: int, capacity: int, window: int | None) -> tuple[Tensor, Tensor]:
    """Positions of the S new queries (B, S) and the bias (B, 1, S, C+S) over C cached + S new keys."""
    B = start.shape[0]
    start = start.to(torch.int64)
    q_pos = start.unsqueeze(1) + torch.arange(S, device=start.device)  # (B, S)
    slots = torch.arange(capacity, device=start.device).expand(B, capacity)  # (B, C)
    k_pos = torch.cat([slots, q_pos], dim=1)  # (B, C+S)
    k_valid = torch.cat([slots < start.unsqueeze(1), torch.ones_like(q_pos, dtype=torch.bool)], dim=1)
    return q_pos, self_attention_bias(q_pos, k_pos, k_valid, window)


def entropy_step(model: EntropyModel, tokens: Tensor, start: Tensor, past: KV) -> tuple[Tensor, KV]:
    """tokens (B, S) -> next-byte entropies (B, S) fp32 and the new (k, v) per layer."""
    B, S = tokens.shape
    q_pos, bias = cached_bias(start, S, past[0][0].shape[2], model.cfg.window)
    x, present = run_layers(model.layers, model.cfg, model.tok_embeddings(tokens), q_pos, bias, past)
    return entropy(model.output(model.norm(x))), present


def encoder_step(model: BltModel, tokens: Tensor, hash_ids: Tensor, start: Tensor, past: KV) -> tuple[Tensor, KV]:
    """tokens (B, S), host-computed hash ids (B, S, T) -> encoder byte states (B, S, d_local)."""
    B, S = tokens.shape
    cfg = model.config.encoder
    q_pos, bias = cached_bias(start, S, past[0][0].shape[2], cfg.window)
    return run_layers(model.local_encoder.layers, cfg, model.embed(tokens, hash_ids), q_pos, bias, past)


def patch_slots_padded(model: BltModel, patch_bytes: Tensor, patch_lens: Tensor) -> Tensor:
    """Encoder output of Pn patches given as padded byte states: (B, Pn, L, d), (B, Pn) -> (B, Pn, k*d).

    Max-pool over the patch's bytes (an empty patch pools to 0, as the released scatter does),
    project to k slots, cross-attend over the patch's bytes with the doubled residual.
    """
    B, Pn, L, D = patch_bytes.shape
    k = model.config.cross_attn_k
    valid = torch.arange(L, device=patch_bytes.device) < patch_lens.unsqueeze(-1)  # (B, Pn, L)
    low = torch.finfo(patch_bytes.dtype).min
    pooled = patch_bytes.masked_fill(~valid.unsqueeze(-1), low).amax(dim=2)  # (B, Pn, d)
    pooled = torch.where(patch_lens.unsqueeze(-1) > 0, pooled, torch.zeros_like(pooled))
    q = model.local_encoder.patch_embedding_projection(pooled).view(B * Pn, k, D)  # (B*Pn, k, d)
    xattn = model.local_encoder.cross_attn_layers[0]
    keys, values = xattn.keys_values(patch_bytes.reshape(B * Pn, L, D))  # (B*Pn, L, d)
    bias = torch.where(valid, 0.0, NEG).view(B * Pn, 1, 1, L)
    return (q + xattn(q, keys, values, bias)).view(B, Pn, k * D)


def global_step(
    model: BltModel, patch_bytes: Tensor, patch_lens: Tensor, start: Tensor, past: KV
) -> tuple[Tensor, KV, KV]:
    """Newly closed patches -> latents (B, Pn, d_global), the decoder's cross-attention keys/values
    for them per decoder cross layer ((B, Pn, k, d_local) each), and the global cache entries."""
    x = patch_slots_padded(model, patch_bytes, patch_lens)
    g = model.global_transformer
    if g.token_embedding_projection is not None:
        x = g.token_embedding_projection(x)
    cfg = model.config.global_model
    q_pos, bias = cached_bias(start, x.shape[1], past[0][0].shape[2], cfg.window)
    latents, present = run_layers(g.layers, cfg, x, q_pos, bias, past)
    return latents, model.decoder_cross_kv(latents), present


def decoder_step(
    model: BltModel, h: Tensor, read_patch: Tensor, start: Tensor, past: KV, cross_kv: KV
) -> tuple[Tensor, KV]:
    """Causal decoder: byte states (B, S, d) + the patch each reads (B, S) -> logits (B, S, V) fp32.

    cross_kv: per decoder cross layer, the (B, P_cap, k, d) keys/values written by global steps.
    """
    B, S, _ = h.shape
    q_pos, bias = cached_bias(start, S, past[0][0].shape[2], model.config.decoder.window)
    return model.decoder_layers(h, q_pos, read_patch, cross_kv, bias, past)


def block_bias(start: Tensor, S: int, capacity: int, window: int | None) -> tuple[Tensor, Tensor]:
    """BLT-D block: causal (windowed) to clean slots < start, bidirectional inside the block."""
    q_pos, bias = cached_bias(start, S, capacity, window)
    inside = torch.zeros(bias.shape[0], 1, S, S, dtype=bias.dtype, device=bias.device)
    return q_pos, torch.cat([bias[..., :capacity], inside], dim=-1)


def decoder_block_step(
    model: BltModel, block_ids: Tensor, start: Tensor, read_patch: Tensor, past: KV, cross_kv: KV
) -> Tensor:
    """The diffusion head: a block of ids with [MASK] at positions start..start+S-1 -> logits (B, S, V).

    Every block position reads the latent `read_patch` (B,) and attends to the clean prefix cache
    (slots < start) and to the whole block; nothing is written to any cache.
    """
    B, S = block_ids.shape
    q_pos, bias = block_bias(start, S, past[0][0].shape[2], model.config.decoder.window)
    read = read_patch.view(B, 1).expand(B, S)
    logits, _ = model.decoder_layers(model.embed_block(block_ids), q_pos, read, cross_kv, bias, past)
    return logits


def empty_cache(n_layers: int, batch: int, n_heads: int, capacity: int, head_dim: int, dtype=torch.float32) -> KV:
    """Zeroed (k, v) buffers (B, H, C, hd) per layer."""
    return [
        (
            torch.zeros(batch, n_heads, capacity, head_dim, dtype=dtype),
            torch.zeros(batch, n_heads, capacity, head_dim, dtype=dtype),
        )
        for _ in range(n_layers)
    ]


def write_cache(cache: KV, present: KV, start: Tensor) -> None:
    """Write each layer's new entries (B, H, S, hd) at slots start..start+S-1, in place."""
    for (ck, cv), (k, v) in zip(cache, present, strict=True):
        S = k.shape[2]
        for b in range(k.shape[0]):
            s = int(start[b])
            ck[b, :, s : s + S] = k[b]
            cv[b, :, s : s + S] = v[b]
