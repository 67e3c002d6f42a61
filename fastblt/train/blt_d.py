"""BLT-D training pieces: batched entropy patching, diffusion blocks, the two losses, evaluation.

The objective (reference/fast_blt_algorithms.md section 2):
    L = L_clean + w * L_mask
    L_clean = mean next-byte CE over the N-1 predicted clean positions
    L_mask  = sum over masked, non-[PAD] block cells of CE / max(t, t_min), divided by the number
              of non-[PAD] block cells in the batch (so both terms are per-position means and an
              unmasked cell counts as 0: E[L_mask] = mean CE over masked cells, same scale as L_clean)
Blocks start at every patch start after the first (patch 0 is BOS), hold B bytes (overlapping,
[PAD] past the end), and read the latent of the patch that ends right before them. One
t ~ U(0, 1) per example masks each block cell independently with probability t.
`max_blocks` optionally keeps a random subset of each row's blocks (all rows padded to the same
M with all-[PAD] blocks); with per-cell normalization that is an unbiased estimate of L_mask.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastblt.model.blt import BltModel
from fastblt.model.config import BltConfig
from fastblt.model.layers import fused_attention
from fastblt.model.patching import decoder_patch_ids, entropy

LN2 = math.log(2.0)


def patch_starts_from_entropies(ent: Tensor, threshold: float) -> Tensor:
    """(B, N) entropies -> (B, N) bool: is byte i the first byte of a patch?

    Byte 0 and byte 1 start patches; byte i+1 starts one when H_i > threshold (strict), i >= 1.
    (No max_patch_length: the default config has none.)
    """
    B, N = ent.shape
    starts = torch.zeros(B, N, dtype=torch.bool, device=ent.device)
    starts[:, 0] = True
    if N > 1:
        starts[:, 1] = True
        starts[:, 2:] = ent[:, 1 : N - 1] > threshold
    return starts


def lengths_from_starts(starts: Tensor) -> Tensor:
    """(B, N) bool starts -> (B, P) int64 patch lengths summing to N, right-padded with 0.

    Same result as patching.patch_lengths_from_entropies for a config without max_patch_length,
    except that no trailing 0-length "next patch" is appended (the model accepts both).
    """
    B, N = starts.shape
    counts = starts.sum(-1)  # (B,)
    P = int(counts.max())
    pos = torch.arange(N, device=starts.device).expand(B, N)
    # start positions, left-packed per row; rows with fewer patches padded with N
    key = torch.where(starts, pos, N + pos)
    packed = key.sort(dim=-1).values[:, :P]  # (B, P)
    packed = torch.where(packed >= N, torch.full_like(packed, N), packed)
    ends = torch.cat([packed[:, 1:], torch.full((B, 1), N, device=starts.device, dtype=packed.dtype)], dim=1)
    return (ends - packed).clamp(min=0)


@torch.no_grad()
def patch_batch(model: BltModel, tokens: Tensor, threshold: float | None = None, fused: bool = False) -> Tensor:
    """The frozen entropy model's patch lengths for a batch: (B, N) -> (B, P) int64.

    fused: the fused attention kernel (training only: 3.5x faster, a borderline boundary may differ).
    Always in fp32, also under the trainer's bf16 autocast: the patches are the ones inference makes.
    """
    th = model.config.patching.threshold if threshold is None else threshold
    no_autocast = torch.autocast(tokens.device.type, enabled=False)
    with no_autocast, fused_attention() if fused else contextlib.nullcontext():
        ent = entropy(model.entropy_model(tokens))
    return lengths_from_starts(patch_starts_from_entropies(ent, th))


def build_blocks(
    tokens: Tensor,
    patch_lengths: Tensor,
    block_size: int,
    pad_id: int,
    gen: torch.Generator | None = None,
    max_blocks: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Clean diffusion blocks at every patch start after the first.

    tokens (B, N); patch_lengths (B, P). Returns
        block_clean (B, M, Bk) int64: tokens[s : s+Bk], pad_id past N and in filler blocks
        block_starts (B, M) int64: s (filler blocks: 0)
        block_read (B, M) int64: the patch ending right before s (encoder patch id of s, minus 1)
        block_valid (B, M) bool: real block (False for the all-[PAD] fillers)
    With `max_blocks`, each row keeps a uniformly random subset of at most that many blocks.
    """
    B, N = tokens.shape
    dev = tokens.device
    starts = torch.cumsum(patch_lengths, -1) - patch_lengths  # (B, P)
    real = (patch_lengths > 0) & (starts < N)
    real[:, 0] = False  # patch 0 (BOS) has no block
    rows = []
    for b in range(B):
        idx = real[b].nonzero().squeeze(-1)  # patch indices i >= 1
        if max_blocks is not None and idx.numel() > max_blocks:
            keep = torch.randperm(idx.numel(), generator=gen)[:max_blocks].sort().values
            idx = idx[keep]
        rows.append(idx)
    M = max(1, max(r.numel() for r in rows))
    block_starts = torch.zeros(B, M, dtype=torch.int64, device=dev)
    block_read = torch.zeros(B, M, dtype=torch.int64, device=dev)
    block_valid = torch.zeros(B, M, dtype=torch.bool, device=dev)
    for b, idx in enumerate(rows):
        block_starts[b, : idx.numel()] = starts[b, idx]
        block_read[b, : idx.numel()] = idx - 1
        block_valid[b, : idx.numel()] = True
    cell = block_starts.unsqueeze(-1) + torch.arange(block_size, device=dev)  # (B, M, Bk)
    inside = (cell < N) & block_valid.unsqueeze(-1)
    gathered = torch.gather(tokens, 1, cell.clamp(max=N - 1).view(B, -1)).view(B, M, block_size)
    block_clean = torch.where(inside, gathered, torch.full_like(gathered, pad_id))
    return block_clean, block_starts, block_read, block_valid


def mask_blocks(block_clean: Tensor, t: Tensor, mask_id: int, pad_id: int, gen: torch.Generator | None) -> Tensor:
    """Absorbing-state corruption: each non-[PAD] cell becomes [MASK] with probability t (per row).

    block_clean (B, M, Bk); t (B,) -> is_masked (B, M, Bk) bool.
    """
    u = torch.rand(block_clean.shape, generator=gen, device=block_clean.device)
    return (u < t.view(-1, 1, 1)) & (block_clean != pad_id)


def mask_loss(
    block_logits: Tensor, block_clean: Tensor, masked: Tensor, t: Tensor, pad_id: int, t_min: float = 0.05
) -> Tensor:
    """L_mask: sum of CE / max(t, t_min) over masked cells, divided by the number of non-[PAD] cells.

    block_logits (B, M, Bk, V); block_clean (B, M, Bk) targets; masked (B, M, Bk) bool (never
    True on [PAD]); t (B,). [PAD] cells add nothing to the sum or to the count.
    """
    V = block_logits.shape[-1]
    ce = F.cross_entropy(
        block_logits.reshape(-1, V), block_clean.clamp(max=V - 1).reshape(-1), reduction="none"
    ).view_as(block_clean)  # (B, M, Bk); [PAD] targets clamped, then weighted 0 below
    is_real = block_clean != pad_id
    weight = (masked & is_real).float() / t.clamp(min=t_min).view(-1, 1, 1)
    return torch.where(weight > 0, ce * weight, 0.0).sum() / is_real.sum().clamp(min=1)


def blt_d_loss(
    model: BltModel,
    tokens: Tensor,
    patch_lengths: Tensor,
    gen: torch.Generator | None,
    max_blocks: int | None = None,
    t_min: float = 0.05,
    mask_weight: float = 1.0,
    hash_dropout: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """L_clean + mask_weight * L_mask for one batch (module docstring). tokens (B, N) -> scalar."""
    cfg = model.config
    assert cfg.blt_d is not None, "blt_d_loss needs a BLT-D config"
    B, N = tokens.shape
    bd = cfg.blt_d
    block_clean, block_starts, block_read, block_valid = build_blocks(
        tokens, patch_lengths, bd.block_size, bd.pad_id, gen, max_blocks
    )
    t = torch.rand(B, generator=gen)  # (B,) one noise level per example
    masked = mask_blocks(block_clean, t, bd.mask_id, bd.pad_id, gen)
    block_ids = torch.where(masked, torch.full_like(block_clean, bd.mask_id), block_clean)
    h = model.encode(tokens, hash_dropout, gen)
    latents = model.global_latents(h, patch_lengths)
    clean_logits, block_logits = model.decode_with_blocks(
        h, latents, decoder_patch_ids(patch_lengths, N), block_ids, block_starts, block_read
    )
    l_clean = F.cross_entropy(clean_logits[:, :-1].reshape(-1, clean_logits.shape[-1]), tokens[:, 1:].reshape(-1))
    l_mask = mask_loss(block_logits, block_clean, masked, t, bd.pad_id, t_min)
    loss = l_clean + mask_weight * l_mask
    n_masked = int(masked.sum())
    acc = float(((block_logits.argmax(-1) == block_clean) & masked).sum()) / max(1, n_masked)
    return loss, {
        "loss_clean": l_clean.item(),
        "loss_mask": l_mask.item(),
        "bpb_clean": l_clean.item() / LN2,
        "train_mask_acc": acc,
        "blocks_per_row": float(block_valid.sum()) / B,
        "mean_patch_len": N / float((patch_lengths > 0).sum() / B),
    }


def lm_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-byte CE (mean, nats) of (B, N, V) logits on tokens (B, N)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


# ------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def eval_bpb(forward, windows: Tensor, batch: int = 8) -> dict[str, float]:
    """Held-out bits per byte: `forward(tokens) -> logits`; windows (W, 1 + n) with BOS first.

    bpb = total CE (nats) over every predicted byte / (count * ln 2); also top-1 accuracy.
    """
    total, count, correct = 0.0, 0, 0
    for i in range(0, windows.shape[0], batch):
        x = windows[i : i + batch]
        logits = forward(x)[:, :-1]
        tgt = x[:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum"))
        correct += int((logits.argmax(-1) == tgt).sum())
        count += tgt.numel()
    return {"bpb": total / count / LN2, "top1": correct / count, "bytes": count}


@torch.no_grad()
def mean_patch_length(model: BltModel, windows: Tensor, batch: int = 16) -> float:
    """Bytes per patch (BOS included as a 1-byte patch) over `windows`."""
    n, p = 0, 0
    for i in range(0, windows.shape[0], batch):
        pl = patch_batch(model, windows[i : i + batch])
        n += windows[i : i + batch].numel()
        p += int((pl > 0).sum())
    return n / p


@torch.no_grad()
def masked_accuracy_inference_layout(
    model: BltModel,
    windows: Tensor,
    rates: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0),
    blocks_per_window: int = 4,
    min_prefix: int = 64,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Masked-byte accuracy with one block after a real prefix and nothing else visible.

    For each window, `blocks_per_window` patch starts s >= min_prefix (with s + B <= N) are drawn;
    the model sees only tokens[:s] (encoder, global over the prefix's patches) plus one block of
    B cells at s reading the patch that ends at s-1 (M = 1: exactly the inference layout). Each
    rate masks cells independently (at least one). AR top-1 on the same masked positions comes
    from the clean forward of the whole window (teacher forcing). Returns per rate:
    {"masked_acc", "ar_acc", "cells"}.
    """
    cfg: BltConfig = model.config
    Bk, mask_id = cfg.blt_d.block_size, cfg.blt_d.mask_id
    gen = torch.Generator().manual_seed(seed)
    hits = {r: [0, 0, 0] for r in rates}  # masked-correct, ar-correct, cells
    for w in range(windows.shape[0]):
        x = windows[w : w + 1]
        N = x.shape[1]
        pl = patch_batch(model, x)
        ar_pred = model(x, pl).argmax(-1)[0]  # (N,) row j predicts token j+1
        starts = (torch.cumsum(pl[0], 0) - pl[0])[pl[0] > 0]
        ok = ((starts >= min_prefix) & (starts + Bk <= N)).nonzero().squeeze(-1)
        if ok.numel() == 0:
            continue
        pick = ok[torch.randperm(ok.numel(), generator=gen)[:blocks_per_window]]
        for i in pick.tolist():
            s = int(starts[i])
            prefix, lengths = x[:, :s], pl[:, :i]  # patches 0..i-1 end exactly at s-1
            h = model.encode(prefix)
            latents = model.global_latents(h, lengths)
            read = decoder_patch_ids(lengths, s)
            truth = x[0, s : s + Bk]
            for r in rates:
                m = torch.rand(Bk, generator=gen) < r
                if not bool(m.any()):
                    m[torch.randint(0, Bk, (1,), generator=gen)] = True
                ids = torch.where(m, torch.full_like(truth, mask_id), truth).view(1, 1, Bk)
                _, bl = model.decode_with_blocks(h, latents, read, ids, torch.tensor([[s]]), torch.tensor([[i - 1]]))
                pred = bl[0, 0].argmax(-1)
                hits[r][0] += int(((pred == truth) & m).sum())
                hits[r][1] += int(((ar_pred[s - 1 : s - 1 + Bk] == truth) & m).sum())
                hits[r][2] += int(m.sum())
    return {str(r): {"masked_acc": a / max(1, c), "ar_acc": b / max(1, c), "cells": c} for r, (a, b, c) in hits.items()}


@torch.no_grad()
def greedy_continue(model: BltModel, prompt: bytes, n_bytes: int = 80) -> bytes:
    """Greedy AR continuation by full recompute per byte (the reference; stops at EOS)."""
    from fastblt.model.config import BOS_ID, BYTE_OFFSET, EOS_ID

    ids = [BOS_ID] + [b + BYTE_OFFSET for b in prompt]
    out = []
    for _ in range(n_bytes):
        x = torch.tensor([ids])
        nxt = int(model(x, patch_batch(model, x))[0, -1].argmax())
        if nxt == EOS_ID or nxt < BYTE_OFFSET:
            break
        ids.append(nxt)
        out.append(nxt - BYTE_OFFSET)
    return bytes(out)
