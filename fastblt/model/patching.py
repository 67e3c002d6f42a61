"""Entropy patching on the host: the threshold rule, max_patch_length, patch ids.

A patch starts at byte 0, at byte 1, and after every byte i >= 1 whose next-byte entropy H_i is
strictly greater than the threshold; a patch that reaches max_patch_length closes as well. H_i
depends only on bytes <= i, so boundaries of earlier bytes never change when bytes are appended.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastblt.model.config import PatchingConfig


def entropy(logits: Tensor) -> Tensor:
    """Next-byte entropy in nats, computed in fp32: (..., V) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def closes_patch(i: int, h_i: float, patch_len: int, patching: PatchingConfig) -> bool:
    """Does the patch holding byte i (now `patch_len` bytes long) end at byte i?

    Byte 0 (BOS) is always a patch of its own; later bytes end their patch when H_i > threshold
    or when the patch has reached max_patch_length.
    """
    if i == 0:
        return True
    if patching.max_patch_length is not None and patch_len >= patching.max_patch_length:
        return True
    return h_i > patching.threshold


def patch_lengths_from_entropies(entropies: Tensor, patching: PatchingConfig) -> Tensor:
    """(B, N) fp32 entropies -> (B, P) int64 patch lengths summing to N (HF convention).

    If the last byte closes its patch, a trailing 0-length patch stands for the next one (so the
    patch count matches Meta's include_next_token=True). Rows are right-padded with zeros.
    """
    B, N = entropies.shape
    rows = []
    for b in range(B):
        h = entropies[b].tolist()
        lengths, cur = [], 0
        for i in range(N):
            cur += 1
            if closes_patch(i, h[i], cur, patching):
                lengths.append(cur)
                cur = 0
        lengths.append(cur)  # the open patch (0 if byte N-1 closed its patch)
        rows.append(lengths)
    P = max(len(r) for r in rows)
    out = torch.zeros(B, P, dtype=torch.int64)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return out


def patch_ids_from_lengths(patch_lengths: Tensor, n: int) -> Tensor:
    """patch_ids[b, i] = (number of patch starts <= i) - 1: (B, P) lengths -> (B, N) ids."""
    starts = torch.cumsum(patch_lengths, dim=-1) - patch_lengths  # (B, P)
    pos = torch.arange(n, device=patch_lengths.device)
    return (starts.unsqueeze(1) <= pos.view(1, -1, 1)).sum(-1) - 1


def decoder_patch_ids(patch_lengths: Tensor, n: int) -> Tensor:
    """The patch whose latent byte i reads: the last patch closed at or before i. (B, N)"""
    return patch_ids_from_lengths(patch_lengths[:, 1:], n)
