"""Sampling and the acceptance rules of the four decoding loops: pure functions on numpy arrays.

Logits come from the step graphs as numpy arrays (torch tensors are taken too); distributions are
(..., V) float32 probabilities on the host, and every draw comes from the request's own seeded
`numpy.random.Generator` (reproducible for a given seed, backend and mode). The host side of a
byte runs right after a step call has evicted the core's caches, where a numpy call costs a few
microseconds and a torch call 10-20: a sampled byte's draw took ~137 us in torch calls.
Greedy decoding is temperature 0: argmax of the logits (ties go to the lowest id). With
temperature > 0 the logits are divided by the temperature, then top-k, then top-p (nucleus) are
applied. A request's logit bias and penalties come first, wherever bytes are chosen (`steer`).

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
from functools import cached_property

import numpy as np
from torch import Tensor

from fastblt.errors import InternalError
from fastblt.model.config import BYTE_OFFSET

Rng = np.random.Generator


def new_rng(seed: int | None) -> Rng:
    """A request's generator: seeded, or from the system's entropy."""
    return np.random.default_rng(seed)


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy (top_k, top_p and seed are then unused). bias: (byte, bias) pairs
    added to those bytes' logits before anything else; presence / frequency: OpenAI's penalties on
    ids generated before (`steer`)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    bias: tuple[tuple[int, float], ...] = ()
    presence: float = 0.0
    frequency: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence != 0.0 or self.frequency != 0.0

    @cached_property
    def _bias_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        ids = np.array([byte + BYTE_OFFSET for byte, _ in self.bias], dtype=np.int64)
        return ids, np.array([b for _, b in self.bias], dtype=np.float32)


def penalty(params: SamplingParams, times: int) -> float:
    """What OpenAI's penalties take off the logit of an id generated `times` (>= 1) times before."""
    return params.frequency * times + params.presence


def steer(
    logits: Tensor | np.ndarray, params: SamplingParams, penalties: np.ndarray | None = None
) -> Tensor | np.ndarray:
    """(..., V) logits with the params' logit bias added and `penalties` taken off (float32, (V,)
    or (..., V): each id's `penalty` for the ids generated before the position a row chooses). A
    copy; the logits themselves when there is nothing to do. What every choice, draft and
    verification reads, so ar and the modes that verify against it agree under them too. Scores
    (log_probs) read the model's own logits."""
    if not params.bias and penalties is None:
        return logits
    x = _array(logits).copy()
    if params.bias:
        ids, values = params._bias_arrays
        x[..., ids] += values
    if penalties is not None:
        x -= penalties
    return x


def _array(x: Tensor | np.ndarray) -> np.ndarray:
    """A float32 numpy view (a copy where it must) of logits or probabilities."""
    if isinstance(x, np.ndarray):
        return x if x.dtype == np.float32 else x.astype(np.float32)
    return x.detach().float().cpu().numpy()


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_probs(logits: np.ndarray) -> np.ndarray:
    """(..., V) logits -> (..., V) float64 log-probabilities of the model's own distribution (no
    temperature, top-k or top-p: what a score means is the model's, whatever the sampler did)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


_TINY = np.finfo(np.float32).tiny


def probs_from_logits(
    logits: Tensor | np.ndarray, params: SamplingParams, penalties: np.ndarray | None = None
) -> np.ndarray:
    """(..., V) logits -> (..., V) float32 probabilities after the logit bias and `penalties`
    (`steer`), temperature, top-k and top-p.

    Greedy params give the softmax of the steered logits (what confidence and entropy unmasking read).
    """
    x = _array(steer(logits, params, penalties))
    if params.greedy:
        return softmax(x)
    # from the row's maximum first: a tiny temperature then sends the others to -inf, not to inf - inf;
    # one below float32's smallest normal number would be 0 there (0 / 0 at the maximum): its limit
    # is the same, so that one divides
    with np.errstate(over="ignore"):
        x = (x - x.max(axis=-1, keepdims=True)) / max(np.float32(params.temperature), _TINY)
    V = x.shape[-1]
    if params.top_k is not None and params.top_k < V:
        kth = np.partition(x, V - params.top_k, axis=-1)[..., V - params.top_k, None]  # the k-th largest
        x = np.where(x < kth, np.float32(-np.inf), x)
    probs = softmax(x)
    if params.top_p is not None and params.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        # drop a cell once the mass before it already reaches top_p (the top cell always stays)
        drop_sorted = (np.cumsum(sorted_p, axis=-1) - sorted_p) >= params.top_p
        drop_sorted[..., 0] = False  # also where top_p is below float32's smallest number
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, np.float32(0.0), probs)
        probs = probs / probs.sum(axis=-1, keepdims=True)
    return probs


def sample(probs: np.ndarray, rng: Rng) -> np.ndarray:
    """One draw per row: (..., V) probabilities (not necessarily normalised) -> (...) int64.

    Inverse transform on the float64 running sum: one uniform per row, so a row's draw consumes
    the same share of its generator whatever the vocabulary."""
    p = _array(probs)
    cum = np.cumsum(p, axis=-1, dtype=np.float64)
    total = cum[..., -1]
    if not (np.isfinite(total) & (total > 0)).all():  # NaN or inf logits, or no mass: never a silent byte
        raise InternalError(f"sampling: a distribution sums to {total.min()} (NaN/inf logits from the step graphs?)")
    u = rng.random(p.shape[:-1]) * total
    idx = (cum <= u[..., None]).sum(axis=-1)  # the first cell whose running sum passes u
    if np.any(idx >= p.shape[-1]):  # u rounded up to the total (~2^-53): the last cell with mass
        last = p.shape[-1] - 1 - np.argmax(p[..., ::-1] > 0, axis=-1)
        idx = np.minimum(idx, last)
    return idx


def pick(
    logits: Tensor | np.ndarray, params: SamplingParams, rng: Rng | None, penalties: np.ndarray | None = None
) -> Tensor | np.ndarray:
    """The next token(s) for (..., V) logits (steered: `steer`): argmax when greedy, else a draw.
    -> (...) int64."""
    if params.greedy:
        return steer(logits, params, penalties).argmax(-1)  # numpy's and torch's: the first of equal maxima
    return sample(probs_from_logits(logits, params, penalties), rng)


def entropy_of(probs: np.ndarray) -> np.ndarray:
    """Entropy in nats of (..., V) probabilities -> (...)."""
    return -(probs * np.log(np.maximum(probs, np.float32(1e-30)))).sum(axis=-1)


# ------------------------------------------------------------------------ unmasking (BLT-D)
def confidence_unmask(confidence: np.ndarray, masked: np.ndarray, alpha: float) -> np.ndarray:
    """Cells to unmask: masked cells with confidence >= alpha, at least the most confident one.

    confidence (B,) float, masked (B,) bool (at least one True) -> (B,) bool.
    """
    chosen = masked & (confidence >= alpha)
    if not chosen.any():  # host sync: one per unmasking step
        chosen = np.zeros_like(masked)
        chosen[np.where(masked, confidence, -1.0).argmax()] = True
    return chosen


def entropy_bound_unmask(entropies: np.ndarray, masked: np.ndarray, gamma: float) -> np.ndarray:
    """Cells to unmask: masked cells by ascending entropy while the running sum <= gamma, at least one.

    entropies (B,) float, masked (B,) bool (at least one True) -> (B,) bool.
    """
    ent = np.where(masked, entropies, np.inf)
    order = np.argsort(ent, kind="stable")
    within = np.cumsum(ent[order]) <= gamma  # inf cells never fit
    within[0] = True  # at least the lowest-entropy masked cell
    chosen = np.zeros_like(masked)
    chosen[order] = within
    return chosen & masked


# ------------------------------------------------------------------------ verification
def greedy_accept(drafts: Sequence[int] | np.ndarray, target_logits: Tensor | np.ndarray) -> tuple[int, int]:
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


def speculative_accept(
    drafts: Sequence[int] | np.ndarray, q: np.ndarray | None, p: np.ndarray, rng: Rng
) -> tuple[int, int]:
    """Speculative-sampling acceptance (Leviathan et al. 2023).

    drafts (k,) ids drawn from q; q (k, V) the draft distributions; p (k+1, V) the verifier's
    (processed the same way). Returns (accepted count a, next byte): the residual draw at the
    first rejection, or the bonus draw from p[k] when all k are accepted.
    """
    d = np.asarray(drafts, dtype=np.int64)
    p, k, a = _array(p), len(d), 0
    if k:  # no drafts, no q (a drafter may return None then)
        q, rows = _array(q), np.arange(k)
        ok = rng.random(k) * q[rows, d] < p[rows, d]  # u < p/q without dividing by q
        a = k if ok.all() else int(np.argmin(ok))  # host sync: accepted length
    if a < k:
        residual = np.maximum(p[a] - q[a], np.float32(0.0))
        # p == q on this row cannot reject; guard against round-off all the same
        return a, int(sample(residual if residual.sum() > 0 else p[a], rng))
    return a, int(sample(p[k], rng))
