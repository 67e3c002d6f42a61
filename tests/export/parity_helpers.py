"""Random step inputs with non-empty caches, and the comparison metrics of DESIGN.md."""

from __future__ import annotations

import torch

from fastblt.export.spec import TORCH_DTYPES, StepSpec
from fastblt.model.config import BltConfig


def random_feeds(
    spec: StepSpec,
    config: BltConfig,
    S: int,
    starts: list[int],
    patch_capacity: int,
    seed: int,
    L: int = 6,
) -> dict[str, torch.Tensor]:
    """fp32 feeds for `spec` with batch len(starts), S new positions (or patches), caches full of
    random entries (only slots < start are valid, the rest is garbage the graph must mask)."""
    g = torch.Generator().manual_seed(seed)
    B = len(starts)
    sizes = {"batch": B, "new": S, "patches": S, "patch_len": L}
    feeds = {}
    for t in spec.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in t.shape]
        if t.name == "start":
            x = torch.tensor(starts, dtype=torch.int32)
        elif t.name == "tokens":
            x = torch.randint(4, config.vocab_size, shape, generator=g, dtype=torch.int32)
        elif t.name == "block_ids":  # bytes, [MASK] (260) and [PAD] (261)
            x = torch.randint(4, config.blt_d.embedding_rows, shape, generator=g, dtype=torch.int32)
        elif t.name == "hash_ids":
            x = torch.randint(0, config.hash_vocab, shape, generator=g, dtype=torch.int32)
        elif t.name == "read_patch":
            x = torch.randint(0, patch_capacity, shape, generator=g, dtype=torch.int32)
        elif t.name == "patch_lens":  # one full-length patch per row, the others 1..L
            x = torch.randint(1, L + 1, shape, generator=g, dtype=torch.int32)
            x[:, 0] = L
        else:
            x = torch.randn(shape, generator=g)
        feeds[t.name] = x
    return feeds


def cast_feeds(feeds: dict[str, torch.Tensor], spec: StepSpec) -> dict[str, torch.Tensor]:
    return {t.name: feeds[t.name].to(TORCH_DTYPES[t.dtype]) for t in spec.inputs}


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def top1_agreement(ref: torch.Tensor, got: torch.Tensor, margin: float = 0.1) -> tuple[float, int]:
    """Share of positions whose argmax agrees, among those where the reference's top-1 leads the
    top-2 by >= margin; returns (agreement, number of such positions)."""
    ref, got = ref.float().reshape(-1, ref.shape[-1]), got.float().reshape(-1, got.shape[-1])
    top2 = ref.topk(2, dim=-1).values
    confident = (top2[:, 0] - top2[:, 1]) >= margin
    n = int(confident.sum())
    if n == 0:
        return 0.0, 0
    agree = (ref.argmax(-1) == got.argmax(-1))[confident]
    return float(agree.float().mean()), n
