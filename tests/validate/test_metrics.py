"""The comparator on hand-made arrays: every gate can fail, and NaN/Inf is its own check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastblt.validate.metrics import (
    FP32,
    REDUCED,
    REDUCED_LOGITS,
    SequenceResult,
    Tolerance,
    Tolerances,
    check_finite,
    compare,
    top1_agreement,
)


def test_identical_arrays_pass_every_gate():
    x = torch.randn(2, 3, 260)
    for tol in (FP32, REDUCED, REDUCED_LOGITS):
        res = compare("logits", x, x.clone(), tol)
        assert res and res.max_abs == 0 and res.cosine == pytest.approx(1.0) and res.top1 == 1.0


def test_max_abs_gate_fails_by_how_much():
    ref = np.zeros((4, 8), dtype=np.float32)
    cand = ref.copy()
    cand[2, 5] = 3e-4
    res = compare("h", ref, cand, FP32)
    assert not res
    assert res.max_abs == pytest.approx(3e-4) and res.worst_index == (2, 5)
    assert res.failed_gates() == ["max_abs 3.00e-04 > 1.00e-04"]
    assert compare("h", ref, cand, Tolerance(atol=1e-3))  # the tolerance decides


def test_cosine_gate_fails():
    ref = torch.randn(64)
    cand = ref + 0.5 * torch.randn(64, generator=torch.Generator().manual_seed(1))
    res = compare("h", ref, cand, REDUCED)
    assert res.cosine < 0.99 and not res
    assert any(line.startswith("cosine") for line in res.failed_gates())


def test_top1_gate_counts_only_rows_with_a_clear_reference_margin():
    ref = torch.zeros(10, 5)
    ref[:, 0] = 1.0  # margin 1.0 on every row
    cand = ref.clone()
    cand[:2, 3] = 2.0  # two rows pick another id
    res = compare("logits", ref, cand, Tolerance(atol=None, top1=0.99))
    assert res.top1 == pytest.approx(0.8) and res.top1_rows == 10 and not res
    # the same flips on rows whose reference margin is below 0.1 are ties: not counted
    ref[:2, 1] = 0.95
    res = compare("logits", ref, cand, Tolerance(atol=None, top1=0.99))
    assert res.top1_rows == 8 and res.top1 == 1.0 and res


def test_top1_without_qualifying_rows_is_not_gated():
    ref = torch.zeros(3, 4)
    assert top1_agreement(ref.numpy(), ref.numpy(), 0.1) == (None, 0, 3)
    assert compare("logits", ref, ref, REDUCED_LOGITS).top1 is None


def test_nan_and_inf_are_a_separate_check_that_fails_the_output():
    ref = torch.ones(6)
    cand = ref.clone()
    cand[1], cand[4] = float("nan"), float("inf")
    assert check_finite(cand).nan == 1 and check_finite(cand).inf == 1
    res = compare("h", ref, cand, FP32)
    assert not res and res.max_abs == 0.0  # statistics over the finite elements only
    assert res.failed_gates()[0] == "non-finite output: 1 NaN and 1 Inf values"
    assert res.to_dict()["nan"] == 1


def test_shape_mismatch_is_a_failure_not_a_broadcast():
    res = compare("h", torch.zeros(2, 3), torch.zeros(3, 2), FP32)
    assert not res and "shape" in res.error


def test_bf16_inputs_are_compared_in_fp64():
    ref = torch.randn(4, 16)
    res = compare("h", ref, ref.to(torch.bfloat16), REDUCED)
    assert res and 0 < res.max_abs < 0.05


def test_tolerances_per_output_with_an_explicit_default():
    tols = Tolerances.for_dtype("bfloat16")
    assert tols.get("logits").top1 == 0.99 and tols.get("present.0.k").top1 is None
    assert Tolerances.for_dtype("float32", atol=1e-3).get("anything").atol == 1e-3
    with pytest.raises(ValueError):
        Tolerances({"logits": FP32})


def test_sequences():
    assert SequenceResult.of([5, 6, 7], [5, 6, 7])
    diff = SequenceResult.of([5, 6, 7], [5, 9, 7])
    assert not diff and diff.first_diff == 1
    assert not SequenceResult.of([], [])  # nothing compared is a failure
    assert SequenceResult.of([5, 6], [5, 6, 7]).first_diff == 2
    tie = SequenceResult.of([5, 6], [5, 9])
    tie.margin, tie.tie_margin = 0.05, 0.1
    assert tie and "near-tie" in tie.summary()
    tie.margin = 0.5
    assert not tie


def test_a_row_whose_reference_margin_is_exactly_the_threshold_is_gated():
    """The gate covers rows with margin >= 0.1 (docs/validation.md): a row at exactly 0.1 is a clear
    decision, and a candidate that flips it fails (fp64 values, so the margin is exactly 0.1)."""
    ref = np.zeros((1, 4))
    ref[0, 0] = 0.1  # top-1 minus top-2: 0.1 - 0.0, exactly the threshold
    cand = ref.copy()
    cand[0, 2] = 1.0
    assert top1_agreement(ref, cand, 0.1) == (0.0, 1, 1)  # counted, and it disagrees


def test_top1_agreement_of_exactly_099_passes():
    """99 of 100 rows agreeing is top-1 agreement 0.99, which meets `top1 >= 0.99`."""
    ref = np.zeros((100, 5))
    ref[:, 0] = 1.0
    cand = ref.copy()
    cand[0, 3] = 2.0  # one row of 100 picks another id
    res = compare("logits", ref, cand, Tolerance(atol=None, top1=0.99))
    assert res.top1 == 0.99 and res.top1_rows == 100
    assert res


def test_a_divergence_at_exactly_the_tie_margin_is_not_a_tie():
    """A reference margin of exactly the tie margin was a decision (the same bound as the top-1 gate's
    rows), so a reduced-precision sequence that parts there fails."""
    seq = SequenceResult.of([5, 6], [5, 9])
    seq.margin, seq.tie_margin = 0.1, 0.1
    assert not seq.at_tie and not seq
