"""Random step inputs (fastblt.validate.graphs.random_feeds: caches with garbage wherever no query
may look) and the comparison metrics of docs/validation.md."""

from __future__ import annotations

import torch

from fastblt.export.spec import TORCH_DTYPES, StepSpec
from fastblt.validate.graphs import random_feeds as random_feeds


def cast_feeds(feeds: dict[str, torch.Tensor], spec: StepSpec) -> dict[str, torch.Tensor]:
    return {t.name: feeds[t.name].to(TORCH_DTYPES[t.dtype], copy=True) for t in spec.inputs}


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
