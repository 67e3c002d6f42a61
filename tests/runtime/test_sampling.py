"""The sampling, acceptance and unmasking rules on hand-written probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastblt.errors import InternalError
from fastblt.runtime.sampling import (
    SamplingParams,
    confidence_unmask,
    entropy_bound_unmask,
    greedy_accept,
    new_rng,
    pick,
    probs_from_logits,
    sample,
    speculative_accept,
    steer,
)


def test_confidence_unmask_threshold_and_at_least_one():
    conf = np.array([0.9, 0.5, 0.71, 0.2], dtype=np.float32)
    masked = np.array([True, True, True, False])
    assert confidence_unmask(conf, masked, 0.7).tolist() == [True, False, True, False]
    # nothing reaches alpha: only the most confident masked cell (not the unmasked one)
    conf = np.array([0.3, 0.5, 0.4, 0.99], dtype=np.float32)
    assert confidence_unmask(conf, masked, 0.7).tolist() == [False, True, False, False]
    # alpha = 0: everything masked goes at once
    assert confidence_unmask(conf, masked, 0.0).tolist() == [True, True, True, False]


def test_confidence_unmask_compares_float32_with_alpha_as_torch_does():
    """float32 confidences are compared with alpha as torch compares them (0.7 is not a float32),
    the fallback included."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        conf = rng.random(8, dtype=np.float32)
        conf[rng.random(8) < 0.2] = np.float32(0.7)  # exactly at the threshold, as float32
        masked = rng.random(8) < 0.6
        masked[rng.integers(8)] = True
        for alpha in (0.0, 0.3, 0.7, 0.95):
            got = confidence_unmask(conf, masked, alpha)
            t_conf, t_masked = torch.from_numpy(conf), torch.from_numpy(masked)
            want = t_masked & (t_conf >= alpha)
            if not want.any():
                want = torch.zeros_like(t_masked)
                want[torch.where(t_masked, t_conf, -1.0).argmax()] = True
            assert got.tolist() == want.tolist()


def test_entropy_bound_unmask_prefix_of_ascending_entropies():
    ent = np.array([0.5, 0.1, 0.3, 0.05, 2.0], dtype=np.float32)
    masked = np.array([True, True, True, False, True])
    # masked, ascending: 0.1, 0.3, 0.5, 2.0 -> running sums 0.1, 0.4, 0.9, 2.9
    assert entropy_bound_unmask(ent, masked, 0.45).tolist() == [False, True, True, False, False]
    assert entropy_bound_unmask(ent, masked, 1.0).tolist() == [True, True, True, False, False]
    # bound below the smallest entropy: still the lowest-entropy masked cell
    assert entropy_bound_unmask(ent, masked, 0.01).tolist() == [False, True, False, False, False]
    assert entropy_bound_unmask(ent, masked, 100.0).tolist() == [True, True, True, False, True]


def test_greedy_accept_longest_agreeing_prefix_plus_one():
    V = 5
    best = [3, 1, 4, 1, 0]  # verifier argmax after c, d1, d2, d3, d4
    logits = np.eye(V, dtype=np.float32)[best]
    for j in range(4):  # first mismatch at draft position j
        drafts = list(best[:4])
        drafts[j] = (drafts[j] + 1) % V
        assert greedy_accept(drafts, logits) == (j, best[j])
    assert greedy_accept(best[:4], logits) == (4, best[4])  # all accepted + bonus
    assert greedy_accept([], logits[:1]) == (0, best[0])


def test_top_k_top_p_temperature():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    close = np.testing.assert_allclose
    close(probs_from_logits(logits, SamplingParams(1.0, top_k=2)), [0.625, 0.375, 0, 0], rtol=1e-6)
    close(probs_from_logits(logits, SamplingParams(1.0, top_p=0.79)), [0.625, 0.375, 0, 0], rtol=1e-6)  # 0.5 + 0.3
    # mass exactly at top_p reaches it: two equal logits give exactly 0.5 each on every CPU
    tie = probs_from_logits(np.array([0.0, 0.0, -np.inf], dtype=np.float32), SamplingParams(1.0, top_p=0.5))
    assert sorted(tie.tolist()) == [0.0, 0.0, 1.0]  # the second 0.5 is dropped (a tie: either one)
    close(probs_from_logits(logits, SamplingParams(1.0, top_p=0.81)), np.array([0.5, 0.3, 0.15, 0]) / 0.95, rtol=1e-6)
    assert probs_from_logits(logits, SamplingParams(1.0, top_p=0.1)).tolist() == [1.0, 0.0, 0.0, 0.0]  # top stays
    want = np.sqrt([0.5, 0.3, 0.15, 0.05])
    close(probs_from_logits(logits, SamplingParams(2.0)), want / want.sum(), rtol=1e-6)
    close(probs_from_logits(torch.from_numpy(logits), SamplingParams(2.0)), want / want.sum(), rtol=1e-6)  # tensors too
    assert int(pick(logits, SamplingParams(), None)) == 0
    batch = probs_from_logits(np.stack([logits, logits[::-1]]), SamplingParams(1.0, top_k=1))  # per row
    assert batch.tolist() == [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]


def test_seeded_sampling_is_reproducible():
    logits = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    params = SamplingParams(1.0, top_p=0.9)
    a = [pick(logits, params, new_rng(7)).tolist() for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert pick(logits, params, new_rng(8)).tolist() != a[0] or pick(logits, params, new_rng(9)).tolist() != a[0]


def _chi2_ok(counts: np.ndarray, probs: np.ndarray) -> bool:
    """Pearson chi-square against probs; True unless p < 1e-4 (Wilson-Hilferty approximation)."""
    n = counts.sum()
    keep = probs > 0
    if (counts[~keep] > 0).any():
        return False
    exp = n * probs[keep]
    stat = float(((counts[keep] - exp) ** 2 / exp).sum())
    df = int(keep.sum()) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return z < 3.72  # one-sided p ~ 1e-4


def test_draws_follow_the_distribution_and_never_a_zero_cell():
    """One uniform per row against the running sum: the draws are distributed as p, a cell without
    mass is never drawn (first, last and inner ones), and unnormalised rows are taken as they are."""
    p = np.array([[0.0, 0.3, 0.0, 0.5, 0.2, 0.0], [0.1, 0.1, 0.0, 0.0, 0.0, 0.8]], dtype=np.float32)
    rng = new_rng(11)
    draws = np.stack([sample(p * 3.0, rng) for _ in range(20000)])  # (N, 2)
    for row in range(2):
        counts = np.bincount(draws[:, row], minlength=6)
        assert _chi2_ok(counts, p[row] / p[row].sum())
    one = sample(p[0], new_rng(1))
    assert one.shape == () and p[0][int(one)] > 0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in the softmax
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_logits_that_are_not_numbers_fail_the_draw_instead_of_picking_a_byte(bad):
    logits = np.zeros(8, dtype=np.float32)
    logits[3] = bad
    with pytest.raises(InternalError, match="sampling: a distribution sums to"):
        pick(logits, SamplingParams(1.0), new_rng(0))
    with pytest.raises(InternalError, match="sampling"):
        sample(np.zeros((2, 4), dtype=np.float32), new_rng(0))  # no mass at all


@pytest.mark.parametrize("case", ["close", "far", "disjoint-support"])
def test_speculative_acceptance_reproduces_p(case):
    """Outputs of the Leviathan rule are distributed as p, whatever q (fixed seed, tiny vocab)."""
    p = np.array([[0.5, 0.2, 0.2, 0.1, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6], [0.2, 0.2, 0.2, 0.2, 0.2]], dtype=np.float32)
    q = {
        "close": np.array([[0.4, 0.3, 0.2, 0.1, 0.0], [0.1, 0.2, 0.1, 0.1, 0.5]], dtype=np.float32),
        "far": np.array([[0.05, 0.05, 0.1, 0.1, 0.7], [0.7, 0.1, 0.1, 0.05, 0.05]], dtype=np.float32),
        "disjoint-support": np.array([[0.0, 0.0, 0.5, 0.0, 0.5], [0.0, 0.5, 0.5, 0.0, 0.0]], dtype=np.float32),
    }[case]
    rng = new_rng(1234)
    N = 20000
    first = np.zeros(5)
    second = np.zeros(5)  # the byte after an accepted first draft
    accepted = 0
    for _ in range(N):
        drafts = sample(q, rng).tolist()
        a, nxt = speculative_accept(drafts, q, p, rng)
        out = [*drafts[:a], nxt]
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
        accepted += a
    assert _chi2_ok(first, p[0])
    assert _chi2_ok(second, p[1])
    if case == "disjoint-support":
        assert first[4] == 0  # p = 0 there: that draft is never accepted


def test_steer_adds_the_bias_to_its_bytes_ids_in_a_copy():
    """A byte's id is byte + 4 (BOE, BOS, EOS and the BPE delimiter first); rows of any shape;
    the caller's logits are left as they were; no bias: the same array, no copy."""
    logits = np.arange(2 * 260, dtype=np.float32).reshape(2, 260)
    before = logits.copy()
    params = SamplingParams(bias=((0, -100.0), (10, 2.5)))
    out = steer(logits, params)
    assert np.array_equal(logits, before)
    want = before.copy()
    want[:, 4] -= 100.0
    want[:, 14] += 2.5
    assert np.array_equal(out, want)
    assert steer(logits, SamplingParams()) is logits
    assert int(pick(logits[0], params, None)) == 259  # still the last id: +2.5 on id 14 does not reach it
    assert int(pick(np.zeros(260, np.float32), params, None)) == 14
    probs = probs_from_logits(np.zeros(260, np.float32), SamplingParams(1.0, bias=((65, 100.0),)))
    assert probs[65 + 4] > 0.999
