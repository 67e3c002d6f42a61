"""The fp32 gate against exact arithmetic: large outputs whose fp32 rounding exceeds 1e-4 pass when
the candidate is as close to fp64 as the torch reference is, and a real error still fails."""

from __future__ import annotations

import copy

import numpy as np
import torch

from fastblt.engines.torch_backend import TorchBackend
from fastblt.export.spec import step_specs
from fastblt.formats.checkpoint import save_checkpoint
from fastblt.validate.graphs import Fp64Reference, GraphRun, graph_parity, random_cases
from fastblt.validate.metrics import FP32, compare
from fastblt.validate.run import ValidateOptions, validate

from tiny import make_model

SCALE = 300.0  # global residual outputs x300: latents of magnitude ~100-700, fp32 spacing ~3e-5


def large_latent_model():
    """A tiny BLT whose global transformer writes large values into its residual stream, as the
    embedded default's does (its latents reach ~600)."""
    model = make_model("hf-test-sizes", n_dec=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("global_transformer") and name.endswith(("attention.wo.weight", "w2.weight")):
                p.mul_(SCALE)
    return model.eval()


def test_compare_judges_a_missed_gate_against_fp64():
    # two fp32 matmuls summing in different orders: both correct, apart by more than 1e-4
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(8, 512)) * 30, rng.normal(size=(512, 256))
    exact = a @ b
    ref = a.astype(np.float32) @ b.astype(np.float32)
    cand = a[:, ::-1].astype(np.float32) @ b[::-1].astype(np.float32)
    plain = compare("latents", ref, cand, FP32)
    assert not plain.passed and plain.gates[0].name == "max_abs"
    judged = compare("latents", ref, cand, FP32, exact=exact)
    assert judged.passed and judged.gates[0].name == "max_abs_vs_fp64"
    wrong = cand.copy()
    wrong[3, 7] += 0.01  # one element off by 1e-2: an error, not rounding
    failed = compare("latents", ref, wrong, FP32, exact=exact)
    assert not failed.passed and [g.name for g in failed.gates if not g.passed] == ["max_abs_vs_fp64"]
    gate = failed.gates[0]
    # the planted 1e-2 dominates whatever order a CPU's BLAS sums in (rounding moves it by ~3e-4)
    assert gate.value > gate.limit and 0.008 < gate.value < 0.012
    assert failed.failed_gates()[0].startswith("max_abs_vs_fp64 ")


def test_compare_without_fp64_keeps_the_plain_gate():
    ref = np.full((2, 4), 500.0, dtype=np.float32)
    cand = ref + np.float32(1e-3)
    res = compare("latents", ref, cand, FP32)
    assert not res.passed and [g.name for g in res.gates] == ["max_abs"]


def test_onnxruntime_passes_on_large_latents_through_the_fp64_gate(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(large_latent_model(), ckpt)
    opts = ValidateOptions(
        checkpoint=str(ckpt), backends=("ort",), graphs=("global",), e2e=False, cache_dir=tmp_path / "cache"
    )
    report = validate(opts)
    assert report, report.failures()
    assert report.meta["fp64_check"] is True
    latents = report[("torch", "ort")]["global"]["latents"]
    judged = [e for e in latents.values() if e.gates[0].name == "max_abs_vs_fp64"]
    assert judged, "no case missed 1e-4 against torch fp32: the model no longer exercises the fp64 gate"
    assert all(e.max_abs > 1e-4 for e in judged)  # each would have failed the plain gate


def test_a_small_weight_error_still_fails_on_large_latents():
    model = large_latent_model()
    specs = step_specs(model.config, 16)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.global_transformer.layers[0].attention.wo.weight.mul_(1 + 1e-5)
    cases = random_cases(specs, model, steps=("global",))
    run = GraphRun(exact=Fp64Reference(model))
    report = graph_parity(cases, TorchBackend(specs, model), {"torch": TorchBackend(specs, broken)}, run)
    assert not report
    assert any("max_abs_vs_fp64" in line for line in report.failures())
