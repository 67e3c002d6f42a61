"""End to end: greedy generation in every mode on every backend, byte for byte against torch.

Each (mode, backend, prompt) runs the real runtime (`fastblt.Generator` and its decoding loops)
over the backend wrapped in a tracing `RecordingBackend`; the torch fp32 reference runs the same
mode the same way. Entries: report[("torch", backend)]["e2e/<mode>"]["bytes"][prompt].

In fp32 the bytes must be identical. In fp16/bf16 a run may part from the reference only where
the reference's logits margin is below 0.1 (the composite gate's near-tie rule): greedy decoding
cannot be stable there. When the bytes differ, the two traces are walked call by call: the first step call whose outputs
fail the gate (or where the call sequences part) is named with its graph (the module: entropy,
encoder, global, decoder, decoder_block), its position and the output that moved; the reference
logits margin at the first differing byte says whether it was a near-tie (numerical) or a real
difference. The reference's own lossless property is checked too: greedy blt-s and blt-dv must
reproduce greedy ar exactly (report[("torch", "torch")]["lossless/<mode>"]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastblt.engines.base import Backend
from fastblt.model.blt import BltModel
from fastblt.model.tokenizer import encode
from fastblt.validate.metrics import REDUCED_DTYPES, TOP1_MARGIN, SequenceResult, Tolerances, compare, logits_margin
from fastblt.validate.recording import RecordingBackend, TraceCall
from fastblt.validate.report import Report

MODES = ("ar", "blt-s", "blt-d", "blt-dv")
LOSSLESS = ("blt-s", "blt-dv")  # greedy output identical to greedy ar (docs/generation.md)
STEP_MODULES = {
    "entropy": "entropy_model",
    "encoder": "local_encoder",
    "global": "global_transformer",
    "decoder": "local_decoder",
    "decoder_block": "local_decoder (diffusion head)",
}


@dataclass
class E2ERun:
    """Options of the end-to-end comparison."""

    modes: tuple[str, ...] = MODES
    max_bytes: int = 32
    reference: str = "torch"
    dtype: str = "float32"
    tolerances: Tolerances | None = None
    lossless: bool = True


def available_modes(model: BltModel, modes: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(modes this checkpoint can run, modes it cannot: blt-d/blt-dv need a BLT-D checkpoint)."""
    ok = [m for m in modes if model.config.blt_d is not None or m not in ("blt-d", "blt-dv")]
    return ok, [m for m in modes if m not in ok]


def make_generator(model: BltModel, backend: Backend):
    """A `Generator` that runs on this backend instance (which the caller may wrap: validation
    inserts a tracing wrapper), without prompt snapshots: every mode's call commits its prompt, so
    every step call of it is traced and compared."""
    from fastblt.runtime.generator import Generator

    return Generator(model, backend=backend, prompt_cache_mb=0)


class _Traced:
    """A backend, its tracing wrapper and a Generator over them."""

    def __init__(self, model: BltModel, backend: Backend):
        self.rec = RecordingBackend(backend, trace=True)
        self.gen = make_generator(model, self.rec)

    def run(self, prompt: str, mode: str, max_bytes: int) -> tuple[list[int], list[TraceCall]]:
        self.rec.trace = []
        out = self.gen.generate(prompt, mode=mode, max_bytes=max_bytes, temperature=0.0, stop_on_eos=False)
        return list(out.ids), self.rec.trace


def e2e_parity(
    model: BltModel,
    reference: Backend,
    candidates: dict[str, Backend],
    prompts: list[str],
    run: E2ERun,
    report: Report | None = None,
) -> Report:
    """Greedy generation per mode x candidate backend x prompt vs the reference backend."""
    report = report if report is not None else Report()
    if model.config.entropy is None:
        report.skip("e2e", "the checkpoint has no entropy model: the runtime cannot patch")
        return report
    modes, missing = available_modes(model, run.modes)
    for m in missing:
        report.skip(f"e2e/{m}", "needs a BLT-D checkpoint (config blt_d); this is a plain BLT checkpoint")
    max_bytes = run.max_bytes
    report.meta["e2e_max_bytes"] = max_bytes
    ref = _Traced(model, reference)
    cands = {}
    for name, backend in candidates.items():
        try:
            cands[name] = _Traced(model, backend)
        except Exception as e:  # noqa: BLE001 - a backend that cannot start is this check's failure
            report.error(f"e2e | {name}: could not start a generator: {type(e).__name__}: {e}")
    for i, prompt in enumerate(prompts):
        ar_ids = None
        for mode in modes:
            call = _Call(model, prompt, f"prompt {i}", mode, max_bytes, run)
            ref_ids, ref_trace = ref.run(prompt, mode, max_bytes)
            ar_ids = ref_ids if mode == "ar" else ar_ids
            if run.lossless and mode in LOSSLESS and ar_ids is not None:
                _lossless(report, call, ar_ids, ref_ids)
            for name, traced in cands.items():
                _candidate(report, call, name, traced, ref_ids, ref_trace)
    return report


@dataclass
class _Call:
    """One (prompt, mode) of the comparison."""

    model: BltModel
    prompt: str
    label: str
    mode: str
    max_bytes: int
    run: E2ERun


def _lossless(report: Report, call: _Call, ar_ids: list[int], ids: list[int]) -> None:
    """The reference's own greedy blt-s / blt-dv must reproduce its greedy ar."""
    res = SequenceResult.of(ar_ids, ids)
    if not res.passed:
        _margin(call.model, call.prompt, res)
        res.note = f"{call.mode} greedy must equal ar greedy"
    ref = call.run.reference
    report.add((ref, ref), f"lossless/{call.mode}", "bytes", call.label, res)


def _candidate(
    report: Report, call: _Call, name: str, traced: _Traced, ref_ids: list[int], ref_trace: list[TraceCall]
) -> None:
    run = call.run
    try:
        cand_ids, cand_trace = traced.run(call.prompt, call.mode, call.max_bytes)
    except Exception as e:  # noqa: BLE001 - reported as this mode's failure on this backend
        report.error(f"e2e/{call.mode} | {name} | {call.label}: raised {type(e).__name__}: {e}")
        return
    res = SequenceResult.of(ref_ids, cand_ids)
    res.tie_margin = TOP1_MARGIN if run.dtype in REDUCED_DTYPES else None
    if not res.passed:
        res.step = first_diverging_call(ref_trace, cand_trace, run.tolerances or Tolerances.for_dtype(run.dtype))
        _margin(call.model, call.prompt, res, call.mode)
    report.add((run.reference, name), f"e2e/{call.mode}", "bytes", call.label, res)


def first_diverging_call(ref: list[TraceCall], cand: list[TraceCall], tolerances: Tolerances) -> dict | None:
    """The first step call where the candidate's outputs fail the gate or the call sequences part."""
    for r, c in zip(ref, cand, strict=False):
        where = {
            "index": r.index,
            "step": r.step,
            "module": STEP_MODULES.get(r.step, r.step),
            "start": r.start[0] if r.start else None,
            "new": r.new,
        }
        if (r.step, r.start, r.new) != (c.step, c.start, c.new):
            return where | {
                "output": None,
                "detail": f"call sequences part: reference {r.step} at {r.start} (new {r.new}), "
                f"candidate {c.step} at {c.start} (new {c.new})",
            }
        bad = []
        for name, x in r.outputs.items():
            if name in c.outputs:
                res = compare(name, x, c.outputs[name], tolerances.get(name))
                if not res.passed:
                    bad.append(res)
        if bad:
            worst = max(bad, key=lambda e: e.max_abs if e.max_abs == e.max_abs else float("inf"))
            out = where | {"output": worst.name, "detail": "; ".join(worst.failed_gates())}
            if "logits" in r.outputs:
                out["ref_margin"] = _min_margin(r.outputs["logits"])
            return out
    if len(ref) != len(cand):
        return {"index": min(len(ref), len(cand)), "step": None, "output": None, "detail": "one run made fewer calls"}
    return None


def _min_margin(logits: torch.Tensor) -> float:
    rows = logits.reshape(-1, logits.shape[-1])
    return min(logits_margin(row)[2] for row in rows)


def _margin(model: BltModel, prompt: str, res: SequenceResult, mode: str = "ar") -> None:
    """Fill the reference choice, the candidate's and the reference's full-recompute margin there."""
    j = res.first_diff
    if j is None or j >= res.compared:
        return
    ids = encode(prompt) + res.ref_ids[:j]
    with torch.no_grad():
        row = model(torch.tensor([ids], dtype=torch.int64))[0, -1]
    _, _, margin = logits_margin(row)
    res.margin, res.ref_choice, res.cand_choice = margin, res.ref_ids[j], res.cand_ids[j]
    if mode == "blt-d":
        why = "margin is the AR full-recompute one (blt-d unmasks by diffusion)"
        res.note = f"{res.note}; {why}" if res.note else why
