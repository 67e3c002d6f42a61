"""Per-graph parity with the torch backend only: cases, torch vs torch, a wrong mask, replay."""

from __future__ import annotations

import copy

import torch

from fastblt.engines.base import Backend
from fastblt.engines.torch_backend import TorchBackend
from fastblt.export.spec import step_specs
from fastblt.validate.graphs import (
    GraphRun,
    graph_parity,
    load_cases,
    random_cases,
    real_cases,
    reference_specs,
)
from fastblt.validate.report import Report

from tiny import make_model

MODEL = make_model("hf-test-sizes", n_dec=2)
SPECS = step_specs(MODEL.config, 16)
PROMPTS = ["def f(x):\n    return x"]


class ShiftedStart(Backend):
    """A backend whose graphs see `start` one too far: the cache mask admits one stale slot."""

    name = "shifted"

    def __init__(self, inner: Backend, step: str):
        super().__init__(inner.specs)
        self.inner, self.step = inner, step

    def _activate_impl(self) -> None:
        self.inner.activate()

    def _run_step_impl(self, step, feeds):
        if step == self.step:
            feeds = {**feeds, "start": feeds["start"] + 1}
        return self.inner.run_step(step, feeds, check=False)


def test_random_cases_cover_cache_lengths_chunk_sizes_and_batch():
    cases = random_cases(SPECS, MODEL)
    dec = [c for c in cases if c.step == "decoder"]
    assert {c.label.split("new=")[1] for c in dec} == {"1", "2", "4", "7"}  # 4 = the BLT-D block
    starts = [int(c.label.split("start=")[1].split()[0]) for c in dec if "batch" not in c.label]
    ring = SPECS["decoder"].slots
    assert 0 in starts and any(s > 2 * ring for s in starts)  # empty, and several laps of the ring on
    assert any("batch=2" in c.label for c in dec)
    feeds = dec[0].make()
    assert torch.equal(feeds["h"], dec[0].make()["h"])  # deterministic
    glob = next(c for c in cases if c.step == "global" and "batch=2" in c.label).make()
    assert glob["patch_bytes"].shape[:2] == (2, 7) and int(glob["patch_lens"].max()) == 5


def test_real_cases_come_from_a_sequence_state():
    cases = real_cases(MODEL, SPECS, PROMPTS, per_step=3)
    assert {c.step for c in cases} == set(SPECS)
    assert all(c.source == "real" and c.label.startswith("real call=") for c in cases)
    enc = [c for c in cases if c.step == "encoder"]
    assert any(int(c.make()["start"][0]) > 0 for c in enc)  # non-empty caches


def test_torch_vs_torch_passes_on_random_and_real_inputs():
    cases = random_cases(SPECS, MODEL) + real_cases(MODEL, SPECS, PROMPTS, per_step=2)
    report = graph_parity(cases, TorchBackend(SPECS, MODEL), {"torch": TorchBackend(SPECS, MODEL)}, GraphRun())
    assert report and report.compared > 100
    assert set(report[("torch", "torch")]) == set(SPECS)


def test_a_wrong_mask_fails_and_names_the_graph():
    cases = random_cases(SPECS, MODEL, steps=("encoder", "decoder"))
    broken = ShiftedStart(TorchBackend(SPECS, MODEL), "decoder")
    report = graph_parity(cases, TorchBackend(SPECS, MODEL), {"shifted": broken}, GraphRun())
    assert not report
    assert report.failed_graphs() == [(("torch", "shifted"), "decoder")]
    assert any(line.startswith("torch vs shifted | decoder | logits: ") for line in report.failures())
    assert "13/13 cases failed, worst random " in report.failures()[0]


def test_bf16_candidate_is_gated_by_the_composite_gate():
    bf16 = step_specs(MODEL.config, 16, "bfloat16")
    cand = TorchBackend(bf16, copy.deepcopy(MODEL).to(torch.bfloat16))
    cases = random_cases(bf16, MODEL, steps=("decoder",))
    report = graph_parity(
        cases, TorchBackend(reference_specs(bf16), MODEL), {"torch": cand}, GraphRun(dtype="bfloat16")
    )
    logits = report[("torch", "torch")]["decoder"]["logits"]
    assert report and all(e.tolerance.atol is None and e.tolerance.cosine == 0.99 for e in logits.values())
    assert all(e.max_abs > 0 for e in logits.values())  # bf16 really differs, and passes by cosine/top-1


def test_save_and_replay_inputs_and_outputs_as_polygraphy_json(tmp_path):
    from polygraphy.comparator import RunResults

    cases = random_cases(SPECS, MODEL, steps=("entropy",))[:3] + random_cases(SPECS, MODEL, steps=("decoder",))[:3]
    run = GraphRun(save_inputs=tmp_path / "in", save_outputs=tmp_path / "out")
    first = graph_parity(cases, TorchBackend(SPECS, MODEL), {"torch": TorchBackend(SPECS, MODEL)}, run)
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == [
        "cases.json",
        "inputs.decoder.json",
        "inputs.entropy.json",
    ]
    results = RunResults.load(str(tmp_path / "out" / "outputs.decoder.json"))
    assert [name for name, _ in results] == ["reference:torch", "torch"] and "logits" in results[0][1][0]
    loaded = load_cases(tmp_path / "in", SPECS)  # files in name order: decoder first
    cases = sorted(cases, key=lambda c: c.step == "entropy")
    assert [c.label for c in loaded] == [f"loaded {c.label}" for c in cases]
    for a, b in zip(cases, loaded, strict=True):
        fa, fb = a.make(), b.make()
        assert all(torch.equal(fa[k], fb[k]) for k in fa)
    again = graph_parity(loaded, TorchBackend(SPECS, MODEL), {"torch": TorchBackend(SPECS, MODEL)}, GraphRun())
    assert again and again.compared == first.compared


def test_two_candidates_without_the_reference_are_compared_by_polygraphy():
    cases = random_cases(SPECS, MODEL, steps=("encoder",))[:3]
    broken = ShiftedStart(TorchBackend(SPECS, MODEL), "encoder")
    cands = {"a": TorchBackend(SPECS, MODEL), "b": broken}
    report = graph_parity(cases, TorchBackend(SPECS, MODEL), cands, GraphRun())
    entries = report[("a", "b")]["encoder"]["h"]
    assert all(e.gate.startswith("polygraphy") for e in entries.values())
    assert not all(e.passed for e in entries.values())  # polygraphy sees the shifted mask too


def test_no_cases_is_a_failure():
    report = graph_parity([], TorchBackend(SPECS, MODEL), {"torch": TorchBackend(SPECS, MODEL)}, GraphRun())
    assert not report and isinstance(report, Report) and report.errors


class Altered(Backend):
    """A backend whose `step` outputs pass through `alter` (an export that lost or broke one)."""

    name = "altered"

    def __init__(self, inner: Backend, step: str, alter):
        super().__init__(inner.specs)
        self.inner, self.step, self.alter = inner, step, alter

    def _activate_impl(self) -> None:
        self.inner.activate()

    def _run_step_impl(self, step, feeds):
        out = dict(self.inner.run_step(step, feeds, check=False))
        return self.alter(out) if step == self.step else out


def _without_entropies(out: dict) -> dict:
    return {k: v for k, v in out.items() if k != "entropies"}


def _nan_in_entropies(out: dict) -> dict:
    bad = out["entropies"].clone()
    bad.view(-1)[0] = float("nan")
    return {**out, "entropies": bad}


def test_a_candidate_missing_an_output_fails_and_names_it():
    """A candidate that returns no `entropies` is not a pass on the outputs it did return: the
    patcher would run on nothing, so the report fails and says which output is missing."""
    cases = random_cases(SPECS, MODEL, steps=("entropy",))[:2]
    cand = Altered(TorchBackend(SPECS, MODEL), "entropy", _without_entropies)
    report = graph_parity(cases, TorchBackend(SPECS, MODEL), {"drops": cand}, GraphRun())
    assert not report
    assert len(report.errors) == 2 and all(
        e.startswith("drops | entropy | ") and e.endswith(": output entropies missing") for e in report.errors
    ), report.errors


def test_a_non_finite_reference_is_reported():
    """A NaN in the reference is named as the reference's fault, not blamed on (or hidden by) the
    candidate's comparison: the gate cannot vouch for outputs measured against garbage."""
    cases = random_cases(SPECS, MODEL, steps=("entropy",))[:1]
    ref = Altered(TorchBackend(SPECS, MODEL), "entropy", _nan_in_entropies)
    report = graph_parity(cases, ref, {"torch": TorchBackend(SPECS, MODEL)}, GraphRun())
    assert not report
    assert report.errors == [f"torch | entropy | {cases[0].label} | entropies: reference is not finite"]
