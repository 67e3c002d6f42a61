"""Sampling and the acceptance rules of the four decoding loops: pure functions on tensors.

Logits come from the step graphs as numpy arrays (torch tensors work too); distributions are
(..., V) float32 torch probabilities on the host. Greedy decoding is temperature 0: argmax of the
raw logits (ties go to the lowest id, in numpy as in torch). With temperature > 0 the
logits are divided by the temperature, then top-k, then top-p (nucleus) are applied, and
tokens are drawn with a seeded `torch.Generator` (reproducible for a given seed, backend and
mode).

Rules (fast_blt_algorithms.md sections 3-6, 8.6):
- `confidence_unmask`: every masked cell whose confidence >= alpha, at least the most confident.
- `entropy_bound_unmask`: masked cells by ascending entropy while the sum stays <= gamma, at
  least the lowest-entropy one.
- `greedy_accept`: accept drafts while each equals the verifier's argmax; the next byte is the
  verifier's argmax after the last accepted one (a correction, or the bonus byte).
- `speculative_accept`: Leviathan et al.'s rule: accept draft x with probability
  min(1, p(x)/q(x)); on the first rejection draw from normalize(max(p - q, 0)); if every draft is
  accepted draw the bonus byte from p. The output distribution is exactly p's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy (top_k, top_p and seed are then unused)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probs_from_logits(logits: Tensor | np.ndarray, params: SamplingParams) -> Tensor:
    """(..., V) logits -> (..., V) float32 probabilities after temperature, top-k and top-p.

    Greedy params give the plain softmax (what confidence and entropy unmasking read).
    """
    if isinstance(logits, np.ndarray) and logits.dtype == np.float32:  # the runtime's: wrapped, not copied
        if not params.greedy:  # float32 / a Python float: one IEEE division per cell in numpy as in torch
            logits = logits / params.temperature
        x = torch.from_numpy(logits)
    else:
        x = torch.as_tensor(logits).float()
        if not params.greedy:
            x = x / params.temperature
    if params.greedy:
        return torch.softmax(x, dim=-1)
    if params.top_k is not None and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]  # (..., 1)
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p is not None and params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # drop a cell once the mass before it already reaches top_p (the top cell always stays)
        drop_sorted = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: Tensor, gen: torch.Generator) -> Tensor:
    """One draw per row: (..., V) probabilities -> (...) int64."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=gen).view(probs.shape[:-1])


def pick(logits: Tensor | np.ndarray, params: SamplingParams, gen: torch.Generator | None) -> Tensor | np.ndarray:
    """The next token(s) for (..., V) logits: argmax when greedy, else a draw. -> (...) int64."""
    if params.greedy:
        return logits.argmax(-1)  # numpy's and torch's: the first of equal maxima
    probs = probs_from_logits(logits, params)
    if logits.ndim == 1:  # one row (a decoding step): the draw `sample` makes, with fewer torch calls
        return torch.multinomial(probs, 1, generator=gen)[0]
    return sample(probs, gen)


def entropy_of(probs: Tensor) -> Tensor:
    """Entropy in nats of (..., V) probabilities -> (...)."""
    logp = torch.log(probs.clamp_min(1e-30))
    return -(probs * logp).sum(-1)


# ------------------------------------------------------------------------ unmasking (BLT-D)
def confidence_unmask(
    confidence: Tensor | np.ndarray, masked: Tensor | np.ndarray, alpha: float
) -> Tensor | np.ndarray:
    """Cells to unmask: masked cells with confidence >= alpha, at least the most confident one.

    confidence (B,) float, masked (B,) bool (at least one True) -> (B,) bool; numpy arrays (the
    runtime's, on the host) or tensors, the same comparisons either way.
    """
    chosen = masked & (confidence >= alpha)
    if not bool(chosen.any()):  # host sync: one per unmasking step
        xp = np if isinstance(confidence, np.ndarray) else torch
        best = xp.where(masked, confidence, -1.0).argmax()
        chosen = xp.zeros_like(masked)
        chosen[best] = True
    return chosen


def entropy_bound_unmask(entropies: Tensor, masked: Tensor, gamma: float) -> Tensor:
    """Cells to unmask: masked cells by ascending entropy while the running sum <= gamma, at least one.

    entropies (B,) float, masked (B,) bool (at least one True) -> (B,) bool.
    """
    ent = torch.where(masked, entropies, torch.full_like(entropies, float("inf")))
    order = torch.argsort(ent, stable=True)
    within = torch.cumsum(ent[order], dim=0) <= gamma  # inf cells never fit
    within[0] = True  # at least the lowest-entropy masked cell
    chosen = torch.zeros_like(masked)
    chosen[order] = within
    return chosen & masked


# ------------------------------------------------------------------------ verification
def greedy_accept(drafts: Sequence[int] | Tensor, target_logits: Tensor | np.ndarray) -> tuple[int, int]:
    """Exact-match acceptance (the paper's Algorithm 2).

    drafts (k,) ids; target_logits (k+1, V): row j predicts the byte after draft position j-1
    (row 0 follows the pending byte). Returns (accepted count a, next byte = argmax of row a).
    """
    best = target_logits.argmax(-1).tolist()  # (k+1,) host sync: the verifier's bytes
    drafts = [int(d) for d in drafts]
    a = 0
    while a < len(drafts) and drafts[a] == best[a]:
        a += 1
    return a, best[a]


def speculative_accept(drafts: Tensor, q: Tensor, p: Tensor, gen: torch.Generator | None) -> tuple[int, int]:
    """Speculative-sampling acceptance (Leviathan et al. 2023).

    drafts (k,) int64 drawn from q; q (k, V) the draft distributions; p (k+1, V) the verifier's
    (processed the same way). Returns (accepted count a, next byte): the residual draw at the
    first rejection, or the bonus draw from p[k] when all k are accepted.
    """
    k = drafts.shape[0]
    if k:
        idx = drafts.view(k, 1)
        p_x, q_x = p[:k].gather(1, idx).squeeze(1), q.gather(1, idx).squeeze(1)
        u = torch.rand(k, generator=gen)
        ok = (u * q_x < p_x).to(torch.int64)  # u < p/q without dividing by q
        a = int(torch.cumprod(ok, dim=0).sum())  # host sync: accepted length
    else:
        a = 0
    if a < k:
        residual = (p[a] - q[a]).clamp_min(0.0)
        total = residual.sum()
        # p == q on this row cannot reject; guard against round-off all the same
        dist = residual / total if float(total) > 0 else p[a]
        return a, int(sample(dist, gen))
    return a, int(sample(p[k], gen))
