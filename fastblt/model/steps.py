"""The five incremental step functions: the contract between export, engines and runtime.

Each step consumes S >= 1 new positions at positions start..start+S-1 (`start` (B,) per row) and
returns their outputs. Its caches are buffers owned by the caller, passed in and updated in place:
the step writes its S new keys/values into them, then attends over all their slots.

- Windowed stacks (a `window`: entropy model, local encoder, local decoder) keep a *ring* of
  R = window + max_step slots: position p lives in slot p mod R. A step's cost is set by R, never
  by how far into the sequence it is.
- Unwindowed stacks (the global transformer) keep a *linear* cache: position p in slot p, the
  caller's buffer holding at least start + S slots (the live prefix, rounded up to a bucket).
- The decoder reads patch latents through a ring of cross-attention keys/values (C slots, patch p
  in slot p mod C), written by the global step.
Caches are (B, heads, slots, head_dim); the cross ring is (B, 1, C, k * d).

Which position a slot holds is data: from `start`, S and the slot count, the masks see every
position in the window and nothing else, so entries left past `start` by a rollback are never
read as long as the caller rolls back at most `max_step` positions (they look older than the
window). Rolling back is therefore O(1): move `start` back. The same function serves prefill
(S large), decode (S = 1), verification (S = k+1) and, for the block step, diffusion blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastblt.model.blt import BltModel, EntropyModel, run_layers
from fastblt.model.layers import NEG, self_attention_bias
from fastblt.model.patching import entropy

KV = list[tuple[Tensor, Tensor]]  # per layer: (keys, values), each (B, heads, slots, head_dim)


def ring_slots(window: int | None, max_step: int) -> int | None:
    """Slots of a windowed stack's ring: every position a query can see, plus the positions one
    step may write (and a rollback may leave behind); None for an unwindowed (linear) stack."""
    return None if window is None else window + max_step


def slot_positions(end: Tensor, slots: int, ring: bool) -> Tensor:
    """The position each slot holds once positions <= end (B,) are written: (B, slots) int64.

    Ring: the latest position <= end in that slot's residue class (negative: never written).
    Linear: the slot index itself (slots past `end` are stale or unwritten: masked by the caller).
    """
    j = torch.arange(slots, device=end.device)
    if not ring:
        return j.expand(end.shape[0], slots)
    return end.unsqueeze(1) - torch.remainder(end.unsqueeze(1) - j, slots)


def cached_bias(start: Tensor, S: int, slots: int, window: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """For S new queries after their entries are written: positions (B, S), the bias over the
    cache's slots (B, 1, S, slots) and the slots the S entries go to (B, S)."""
    start = start.to(torch.int64)
    q_pos = start.unsqueeze(1) + torch.arange(S, device=start.device)  # (B, S)
    end = q_pos[:, -1]
    k_pos = slot_positions(end, slots, window is not None)
    k_valid = (k_pos >= 0) & (k_pos <= end.unsqueeze(1))
    write = q_pos if window is None else torch.remainder(q_pos, slots)
    return q_pos, self_attention_bias(q_pos, k_pos, k_valid, window), write


def block_bias(start: Tensor, S: int, slots: int, window: int | None) -> tuple[Tensor, Tensor]:
    """BLT-D block at start..start+S-1: causal (windowed) to cached positions < start, which the
    cache keeps unwritten, and bidirectional inside the block. Bias (B, 1, S, slots + S)."""
    start = start.to(torch.int64)
    q_pos = start.unsqueeze(1) + torch.arange(S, device=start.device)
    end = start - 1
    k_pos = slot_positions(end, slots, window is not None)
    k_valid = (k_pos >= 0) & (k_pos <= end.unsqueeze(1))
    cached = self_attention_bias(q_pos, k_pos, k_valid, window)
    inside = torch.zeros(start.shape[0], 1, S, S, dtype=cached.dtype, device=cached.device)
    return q_pos, torch.cat([cached, inside], dim=-1)


class WriteThrough:
    """A layer's cache for a step that appends: its keys/values are written into their slots in
    place, and attention reads every slot (the mask picks the visible ones)."""

    def __init__(self, cache: tuple[Tensor, Tensor], write: Tensor):
        self.k_cache, self.v_cache = cache
        self.write = write  # (B, S) slots

    def __call__(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1)  # (B, 1)
        # (B, S, H, hd) into the (B, slots, H, hd) view of each (B, H, slots, hd) cache
        self.k_cache.transpose(1, 2)[rows, self.write] = k.transpose(1, 2).to(self.k_cache.dtype)
        self.v_cache.transpose(1, 2)[rows, self.write] = v.transpose(1, 2).to(self.v_cache.dtype)
        return self.k_cache, self.v_cache


class ReadThrough:
    """A layer's cache for a step that must not write it (the diffusion block): attention reads
    the cache's slots followed by the step's own keys/values."""

    def __init__(self, cache: tuple[Tensor, Tensor]):
        self.k_cache, self.v_cache = cache

    def __call__(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        keys = torch.cat([self.k_cache, k.to(self.k_cache.dtype)], dim=2)
        values = torch.cat([self.v_cache, v.to(self.v_cache.dtype)], dim=2)
        return keys, values


def writers(caches: KV, write: Tensor) -> list[WriteThrough]:
    return [WriteThrough(c, write) for c in caches]


def cross_view(cross: KV, k: int) -> KV:
    """The cross ring (B, 1, C, k*d) as the decoder reads it: (B, C, k, d) views."""
    return [(ck[:, 0].unflatten(-1, (k, -1)), cv[:, 0].unflatten(-1, (k, -1))) for ck, cv in cross]


def entropy_step(model: EntropyModel, tokens: Tensor, start: Tensor, caches: KV) -> Tensor:
    """tokens (B, S) -> next-byte entropies (B, S) fp32; writes the entropy model's ring."""
    B, S = tokens.shape
    cfg = model.cfg
    q_pos, bias, write = cached_bias(start, S, caches[0][0].shape[2], cfg.window)
    x = run_layers(model.layers, cfg, model.tok_embeddings(tokens), q_pos, bias, writers(caches, write))
    return entropy(model.output(model.norm(x)))


def encoder_step(model: BltModel, tokens: Tensor, hash_ids: Tensor, start: Tensor, caches: KV) -> Tensor:
    """tokens (B, S), host-computed hash ids (B, S, T) -> encoder byte states (B, S, d_local)."""
    B, S = tokens.shape
    cfg = model.config.encoder
    q_pos, bias, write = cached_bias(start, S, caches[0][0].shape[2], cfg.window)
    x = model.embed(tokens, hash_ids)
    return run_layers(model.local_encoder.layers, cfg, x, q_pos, bias, writers(caches, write))


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
    model: BltModel, patch_bytes: Tensor, patch_lens: Tensor, start: Tensor, caches: KV, cross: KV
) -> Tensor:
    """Newly closed patches at patch positions start.. -> latents (B, Pn, d_global). Writes the
    global cache and, per decoder cross layer, the patches' keys/values (B, Pn, k, d_local) into
    the cross ring (patch p in slot p mod C)."""
    x = patch_slots_padded(model, patch_bytes, patch_lens)
    g, cfg = model.global_transformer, model.config.global_model
    if g.token_embedding_projection is not None:
        x = g.token_embedding_projection(x)
    Pn = x.shape[1]
    q_pos, bias, write = cached_bias(start, Pn, caches[0][0].shape[2], cfg.window)
    latents = run_layers(g.layers, cfg, x, q_pos, bias, writers(caches, write))
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    for (ck, cv), (k, v) in zip(cross, model.decoder_cross_kv(latents), strict=True):
        slots = torch.remainder(q_pos, ck.shape[2])  # (B, Pn)
        ck[:, 0][rows, slots] = k.flatten(-2).to(ck.dtype)  # (B, Pn, k*d) into (B, C, k*d)
        cv[:, 0][rows, slots] = v.flatten(-2).to(cv.dtype)
    return latents


def decoder_step(model: BltModel, h: Tensor, read_patch: Tensor, start: Tensor, caches: KV, cross: KV) -> Tensor:
    """Causal decoder: byte states (B, S, d) + the patch each reads (B, S) -> logits (B, S, V) fp32.
    Writes the decoder's ring; reads patch p's keys/values from cross ring slot p mod C."""
    B, S, _ = h.shape
    cfg = model.config.decoder
    q_pos, bias, write = cached_bias(start, S, caches[0][0].shape[2], cfg.window)
    read = torch.remainder(read_patch.to(torch.int64), cross[0][0].shape[2])
    cross_kv = cross_view(cross, model.config.cross_attn_k)
    return model.decoder_layers(h, q_pos, read, cross_kv, bias, writers(caches, write))


def decoder_block_step(
    model: BltModel, block_ids: Tensor, start: Tensor, read_patch: Tensor, caches: KV, cross: KV
) -> Tensor:
    """The diffusion head: a block of ids with [MASK] at positions start..start+S-1 -> logits (B, S, V).

    Every block position reads the latent `read_patch` (B,) and attends to the clean prefix cache
    (positions < start) and to the whole block; no cache is written.
    """
    B, S = block_ids.shape
    cfg = model.config.decoder
    q_pos, bias = block_bias(start, S, caches[0][0].shape[2], cfg.window)
    read = torch.remainder(read_patch.to(torch.int64), cross[0][0].shape[2]).view(B, 1).expand(B, S)
    readers = [ReadThrough(c) for c in caches]
    cross_kv = cross_view(cross, model.config.cross_attn_k)
    return model.decoder_layers(model.embed_block(block_ids), q_pos, read, cross_kv, bias, readers)
