"""The acceptance and unmasking rules on hand-written probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastblt.runtime.sampling import (
    SamplingParams,
    confidence_unmask,
    entropy_bound_unmask,
    greedy_accept,
    pick,
    probs_from_logits,
    speculative_accept,
)


def test_confidence_unmask_threshold_and_at_least_one():
    conf = torch.tensor([0.9, 0.5, 0.71, 0.2])
    masked = torch.tensor([True, True, True, False])
    assert confidence_unmask(conf, masked, 0.7).tolist() == [True, False, True, False]
    # nothing reaches alpha: only the most confident masked cell (not the unmasked one)
    conf = torch.tensor([0.3, 0.5, 0.4, 0.99])
    masked = torch.tensor([True, True, True, False])
    assert confidence_unmask(conf, masked, 0.7).tolist() == [False, True, False, False]
    # alpha = 0: everything masked goes at once
    assert confidence_unmask(conf, masked, 0.0).tolist() == [True, True, True, False]


def test_confidence_unmask_on_numpy_equals_torch():
    """The runtime unmasks with the host's numpy arrays: the same cells as on tensors, fallback included,
    and float32 confidences compared with alpha in float32 as torch does (0.7 is not a float32)."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        conf = rng.random(8, dtype=np.float32)
        conf[rng.random(8) < 0.2] = np.float32(0.7)  # exactly at the threshold, as float32
        masked = rng.random(8) < 0.6
        masked[rng.integers(8)] = True
        for alpha in (0.0, 0.3, 0.7, 0.95):
            got = confidence_unmask(conf, masked, alpha)
            want = confidence_unmask(torch.from_numpy(conf), torch.from_numpy(masked), alpha)
            assert isinstance(got, np.ndarray) and got.tolist() == want.tolist()


def test_entropy_bound_unmask_prefix_of_ascending_entropies():
    ent = torch.tensor([0.5, 0.1, 0.3, 0.05, 2.0])
    masked = torch.tensor([True, True, True, False, True])
    # masked, ascending: 0.1, 0.3, 0.5, 2.0 -> running sums 0.1, 0.4, 0.9, 2.9
    assert entropy_bound_unmask(ent, masked, 0.45).tolist() == [False, True, True, False, False]
    assert entropy_bound_unmask(ent, masked, 1.0).tolist() == [True, True, True, False, False]
    # bound below the smallest entropy: still the lowest-entropy masked cell
    assert entropy_bound_unmask(ent, masked, 0.01).tolist() == [False, True, False, False, False]
    assert entropy_bound_unmask(ent, masked, 100.0).tolist() == [True, True, True, False, True]


def test_greedy_accept_longest_agreeing_prefix_plus_one():
    V = 5
    best = [3, 1, 4, 1, 0]  # verifier argmax after c, d1, d2, d3, d4
    logits = torch.nn.functional.one_hot(torch.tensor(best), V).float()
    for j in range(4):  # first mismatch at draft position j
        drafts = torch.tensor(best[:4])
        drafts[j] = (drafts[j] + 1) % V
        assert greedy_accept(drafts, logits) == (j, best[j])
    assert greedy_accept(torch.tensor(best[:4]), logits) == (4, best[4])  # all accepted + bonus
    assert greedy_accept(torch.tensor([], dtype=torch.int64), logits[:1]) == (0, best[0])


def test_top_k_top_p_temperature():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = probs_from_logits(logits, SamplingParams(1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([0.625, 0.375, 0, 0]))
    p = probs_from_logits(logits, SamplingParams(1.0, top_p=0.79))  # 0.5 + 0.3 passes 0.79
    assert torch.allclose(p, torch.tensor([0.625, 0.375, 0, 0]))
    # mass exactly at top_p reaches it: 0.5 + 0.3 from exp(log(.)) lands an ulp from 0.8 in fp32, on
    # the side the CPU's exp kernel rounds to; two equal logits give exactly 0.5 each on every CPU
    tie = probs_from_logits(torch.tensor([0.0, 0.0, float("-inf")]), SamplingParams(1.0, top_p=0.5))
    assert sorted(tie.tolist()) == [0.0, 0.0, 1.0]  # the second 0.5 is dropped (a tie: either one)
    p = probs_from_logits(logits, SamplingParams(1.0, top_p=0.81))
    assert torch.allclose(p, torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    p = probs_from_logits(logits, SamplingParams(1.0, top_p=0.1))  # the top cell always stays
    assert p.tolist() == [1.0, 0.0, 0.0, 0.0]
    p = probs_from_logits(logits, SamplingParams(2.0))
    want = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    assert torch.allclose(p, want / want.sum())
    assert int(pick(logits, SamplingParams(), None)) == 0


def test_numpy_logits_sample_as_torch_logits_do():
    """The runtime's logits are numpy arrays: dividing by the temperature there (one IEEE division
    per cell, as torch's) gives the distribution torch's tensors give, bit for bit, and the same
    draws from the same seed."""
    rng = np.random.default_rng(3)
    for temperature in (0.05, 0.7, 0.8, 1.0, 1.3, 2.0, float(rng.uniform(0.01, 2))):
        for top_k, top_p in ((None, None), (40, None), (None, 0.9)):
            params = SamplingParams(temperature, top_k=top_k, top_p=top_p)
            logits = (rng.standard_normal((4, 260)) * rng.uniform(0.5, 20)).astype(np.float32)
            assert torch.equal(probs_from_logits(logits, params), probs_from_logits(torch.from_numpy(logits), params))
            draws = [
                pick(x, params, torch.Generator().manual_seed(5)).tolist() for x in (logits[0], torch.tensor(logits[0]))
            ]
            assert draws[0] == draws[1]


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(3, 50)
    params = SamplingParams(1.0, top_p=0.9)
    a = [pick(logits, params, torch.Generator().manual_seed(7)).tolist() for _ in range(3)]
    assert a[0] == a[1] == a[2]


def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson chi-square against probs; True unless p < 1e-4 (Wilson-Hilferty approximation)."""
    n = counts.sum()
    keep = probs > 0
    if bool((counts[~keep] > 0).any()):
        return False
    exp = n * probs[keep]
    stat = float(((counts[keep] - exp) ** 2 / exp).sum())
    df = int(keep.sum()) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return z < 3.72  # one-sided p ~ 1e-4


@pytest.mark.parametrize("case", ["close", "far", "disjoint-support"])
def test_speculative_acceptance_reproduces_p(case):
    """Outputs of the Leviathan rule are distributed as p, whatever q (fixed seed, tiny vocab)."""
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = {
        "close": torch.tensor([[0.4, 0.3, 0.2, 0.1, 0.0], [0.1, 0.2, 0.1, 0.1, 0.5]]),
        "far": torch.tensor([[0.05, 0.05, 0.1, 0.1, 0.7], [0.7, 0.1, 0.1, 0.05, 0.05]]),
        "disjoint-support": torch.tensor([[0.0, 0.0, 0.5, 0.0, 0.5], [0.0, 0.5, 0.5, 0.0, 0.0]]),
    }[case]
    gen = torch.Generator().manual_seed(1234)
    N = 20000
    first = torch.zeros(5)
    second = torch.zeros(5)  # the byte after an accepted first draft
    accepted = 0
    for _ in range(N):
        drafts = torch.multinomial(q, 1, generator=gen)[:, 0]
        a, nxt = speculative_accept(drafts, q, p, gen)
        out = [*drafts[:a].tolist(), nxt]
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
        accepted += a
    assert _chi2_ok(first, p[0])
    assert _chi2_ok(second, p[1])
    if case == "disjoint-support":
        assert first[4] == 0  # p = 0 there: that draft is never accepted
