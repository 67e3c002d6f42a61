"""Per-graph parity: the same feeds through every backend, each output compared with torch fp32.

Feeds come from two sources:
- random: every step at several starts (0, inside the first lap of a ring, and several laps on, so
  ring slots wrap around) and chunk sizes (1, 2, 7 and a full diffusion block), plus a batch-2
  case with different starts per row. Cache slots that no query of the call may see (outside
  every window, never written, or left by a rollback) hold large garbage: a graph that reads them
  (a wrong mask, a slot taken for the wrong position) fails visibly.
- real: the feeds a `SequenceState` gives the torch backend while it prefills prompts (in one
  max_step chunks and in chunks of 7 and 2), decodes greedily byte by byte, verifies a 4-byte draft and runs
  diffusion blocks, captured by a recording backend.
Cases are materialized one at a time and dropped after every backend ran it; each backend gets
its own copy of the feeds, since a step writes its caches in place. Reduced-precision candidates
get the feeds rounded to their dtype, and the reference gets the same rounded values in fp32, so
both see identical inputs.

Polygraphy: saved inputs are polygraphy JSON (`inputs.<step>.json`, a list of feed dicts, one per
case, loadable by `polygraphy run <step>.onnx --load-inputs`); saved outputs are polygraphy
`RunResults` (`outputs.<step>.json`, one runner per backend, the reference as `reference:torch`,
one iteration per case): `polygraphy run <step>.onnx --onnxrt --load-inputs inputs.<step>.json
--load-outputs outputs.<step>.json` replays and compares them with polygraphy alone. Candidate
pairs without the torch reference (ort vs trt) are compared by polygraphy's `Comparator`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastblt.engines.base import Backend, check_feeds
from fastblt.errors import InputError
from fastblt.export.spec import CROSS, PAST, PAST_BUCKET, TORCH_DTYPES, StepSpec, max_step, past_slots
from fastblt.model.blt import BltModel
from fastblt.model.config import BltConfig
from fastblt.model.steps import slot_positions
from fastblt.model.tokenizer import encode
from fastblt.validate.metrics import REDUCED_DTYPES, Tolerances, check_finite, compare, to_numpy
from fastblt.validate.recording import RecordingBackend, host_copies, sparse_schedule
from fastblt.validate.report import Report

CHUNK_SIZES = (1, 2, 7)  # plus the diffusion block size (8 for a plain BLT)
PATCH_LEN = 5  # longest patch in random global-step cases
GARBAGE_STD = 4.0  # scale of the values in cache slots >= start (must be masked out)
DEFAULT_PROMPTS = (
    "def main(argv=None):\n    parser = argparse.ArgumentParser(",
    'class Point:\n    """A point in the plane."""\n\n    def __init__(self, x, y):\n',
    "import os\nfor root, dirs, files in os.walk(path):\n    ",
)


@dataclass
class Case:
    """One step call to run on every backend. `make()` builds its fp32 feeds (deterministic)."""

    step: str
    label: str
    source: str  # "random" | "real" | "loaded"
    make: Callable[[], dict[str, Tensor]] = field(repr=False)


# ------------------------------------------------------------------------------ random cases
def random_cases(
    specs: dict[str, StepSpec],
    model: BltModel,
    seed: int = 0,
    chunk_sizes: tuple[int, ...] | None = None,
    steps: tuple[str, ...] | None = None,
) -> list[Case]:
    """Random feeds for every step: starts {0, first lap, several laps on} x chunk sizes, + batch 2."""
    config = model.config
    block = config.blt_d.block_size if config.blt_d is not None else 8
    sizes = tuple(sorted(set(chunk_sizes or (*CHUNK_SIZES, block))))
    cases = []
    for step in steps or tuple(specs):
        spec = specs[step]
        lap = spec.slots if spec.ring else 3 * PAST_BUCKET  # linear caches: a few buckets in
        for n_new in (n for n in sizes if n <= spec.max_step):
            for j, c in enumerate((0, lap // 3 + 1, 3 * lap + lap // 2 + 1)):
                kseed = seed * 100003 + zlib.crc32(f"{step}/{n_new}/{c}".encode()) % 100000
                label = f"random start={c} new={n_new}"
                cases.append(Case(step, label, "random", _maker(spec, model, [c], n_new, kseed)))
                if j == 1 and n_new == sizes[-1]:
                    starts = [c, 2 * lap + 5]
                    label = f"random batch=2 start={starts} new={n_new}"
                    cases.append(Case(step, label, "random", _maker(spec, model, starts, n_new, kseed + 1)))
    return cases


def _maker(spec: StepSpec, model: BltModel, starts: list[int], S: int, seed: int) -> Callable[[], dict[str, Tensor]]:
    return lambda: random_feeds(spec, model.config, starts, S, seed)


def visible_slots(spec: StepSpec, window: int | None, start: Tensor, S: int, slots: int) -> Tensor:
    """(B, slots) bool: the cache slots some query of this call may see (the rest may hold anything)."""
    start = start.to(torch.int64)
    end = start - 1 if spec.name == "decoder_block" else start + S - 1  # the block writes nothing
    k_pos = slot_positions(end, slots, spec.ring)
    oldest = start - (window - 1) if window is not None else torch.zeros_like(start)
    return (k_pos >= oldest.clamp(min=0).unsqueeze(1)) & (k_pos <= end.unsqueeze(1))


def random_feeds(spec: StepSpec, config: BltConfig, starts: list[int], S: int, seed: int) -> dict[str, Tensor]:
    """fp32 feeds for `spec`: batch len(starts), S new positions (Pn patches for the global step).

    Cache slots some query may see ~ N(0, 1); all others ~ N(0, GARBAGE_STD^2).
    """
    stack = {"entropy": config.entropy, "encoder": config.encoder, "global": config.global_model}
    window = stack.get(spec.stack, config.decoder).window
    g = torch.Generator().manual_seed(seed)
    B = len(starts)
    start = torch.tensor(starts, dtype=torch.int32)
    L = PATCH_LEN if spec.name == "global" else 1
    past = past_slots(max(starts) + S)  # what the runtime feeds a linear cache holding them
    sizes = {"batch": B, "new": S, "patches": S, "patch_len": L, "past": past}
    feeds: dict[str, Tensor] = {}
    for t in spec.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in t.shape]
        if t.name == "start":
            feeds[t.name] = start
        elif t.name.startswith(f"{PAST}."):
            x = torch.randn(shape, generator=g)
            seen = visible_slots(spec, window, start, S, shape[2]).view(B, 1, -1, 1)
            feeds[t.name] = torch.where(seen, x, x * GARBAGE_STD)
        elif t.dtype != "int32":
            feeds[t.name] = torch.randn(shape, generator=g)
        elif t.name == "tokens":
            feeds[t.name] = torch.randint(0, config.vocab_size, shape, generator=g, dtype=torch.int32)
        elif t.name == "hash_ids":
            feeds[t.name] = torch.randint(0, config.hash_vocab, shape, generator=g, dtype=torch.int32)
        elif t.name == "block_ids":
            ids = torch.randint(4, config.vocab_size, shape, generator=g, dtype=torch.int32)
            mask = torch.rand(shape, generator=g) < 0.5
            feeds[t.name] = torch.where(mask, torch.full_like(ids, config.blt_d.mask_id), ids)
        elif t.name == "read_patch":  # patch ids over several laps of the cross ring
            ring = spec.input(f"{CROSS}.0.k").shape[2]
            feeds[t.name] = torch.randint(0, 3 * ring, shape, generator=g, dtype=torch.int32)
        elif t.name == "patch_lens":
            lens = torch.randint(1, L + 1, shape, generator=g, dtype=torch.int32)
            lens.view(-1)[0] = L  # the longest patch sets L
            feeds[t.name] = lens
        else:
            raise InputError(f"graph {spec.name} | input {t.name}: no random generator for this input")
    if "patch_bytes" in feeds:  # zero the padding past each patch's length, as the runtime does
        valid = torch.arange(L).view(1, 1, L, 1) < feeds["patch_lens"].unsqueeze(-1).unsqueeze(-1)
        feeds["patch_bytes"] = feeds["patch_bytes"] * valid
    return feeds


# ------------------------------------------------------------------------------ real cases
def real_cases(
    model: BltModel,
    specs: dict[str, StepSpec],
    prompts: list[str] | None = None,
    per_step: int = 6,
    decode_bytes: int = 8,
) -> list[Case]:
    """Feeds captured from a SequenceState over the torch backend (fp32) running `prompts`."""
    from fastblt.engines.torch_backend import TorchBackend
    from fastblt.runtime.state import SequenceState

    prompts = list(prompts or DEFAULT_PROMPTS)
    config = model.config
    fp32 = {name: _with_dtype(spec, "float32") for name, spec in specs.items()}
    rec = RecordingBackend(TorchBackend(fp32, model), select=lambda s, i: sparse_schedule(i), max_per_step=per_step)
    block = config.blt_d.block_size if config.blt_d is not None else 0
    steps = max_step(specs)
    for p, prompt in enumerate(prompts):
        state = SequenceState(rec, config)
        ids = np.asarray(encode(prompt), dtype=np.int64)
        chunks = _chunks(len(ids), (steps,)) if p % 2 == 0 else _chunks(len(ids), (7, 2))
        logits = None
        at = 0
        for size in chunks:
            logits = state.run(state.append(ids[at : at + size]))
            at += size
        for _ in range(decode_bytes):
            logits = state.run(state.append([int(logits[-1].argmax())]))
        n = state.n
        drafts = [int(logits[-1].argmax()), 4 + ord(" "), 4 + ord("("), 4 + ord(")")]
        state.run(state.append(drafts))  # a BLT-S verify pass over 4 positions, then the rollback
        state.rollback(n)
        if block:
            masks = np.full(block, config.blt_d.mask_id, dtype=np.int64)
            state.run(state.run_block(masks, read_patch=max(state.g_len - 1, 0)))
            masks[: block // 2] = 4 + ord("x")
            state.run(state.run_block(masks, read_patch=max(state.g_len - 1, 0)))
    cases = []
    for step, i, feeds in rec.recorded:
        start = int(feeds["start"][0])
        S = _new(feeds)
        cases.append(Case(step, f"real call={i} start={start} new={S}", "real", _const(feeds)))
    return cases


def _chunks(n: int, pattern: tuple[int, ...]) -> list[int]:
    out, k = [], 0
    while sum(out) < n:
        out.append(min(pattern[k % len(pattern)], n - sum(out)))
        k += 1
    return out


def _new(feeds: dict[str, Tensor]) -> int:
    for name in ("tokens", "h", "block_ids", "patch_lens"):
        if name in feeds:
            return int(feeds[name].shape[1])
    return -1


def _const(feeds: dict[str, Tensor]) -> Callable[[], dict[str, Tensor]]:
    return lambda: {k: v.float() if v.is_floating_point() else v for k, v in feeds.items()}


def _with_dtype(spec: StepSpec, dtype: str) -> StepSpec:
    from dataclasses import replace

    def conv(ts):
        return tuple(replace(t, dtype=dtype) if t.dtype in ("float16", "bfloat16", "float32") else t for t in ts)

    outputs = tuple(replace(t, dtype="float32") if t.name in ("logits", "entropies") else t for t in conv(spec.outputs))
    return replace(spec, inputs=conv(spec.inputs), outputs=outputs)


def reference_specs(specs: dict[str, StepSpec]) -> dict[str, StepSpec]:
    """The candidates' specs with every float tensor in fp32 (what the torch reference runs)."""
    return {name: _with_dtype(spec, "float32") for name, spec in specs.items()}


# ------------------------------------------------------------------------------ running
def cast_feeds(feeds: dict[str, Tensor], spec: StepSpec) -> dict[str, Tensor]:
    """A backend's own copy of the feeds (a step writes its caches in place), in the dtypes `spec`
    declares (floats cast; ints must already match)."""
    return {t.name: feeds[t.name].to(TORCH_DTYPES[t.dtype], copy=True) for t in spec.inputs}


def round_trip(feeds: dict[str, Tensor], dtype: str) -> dict[str, Tensor]:
    """Round float feeds to `dtype` and back to fp32, so that every backend sees the same values."""
    if dtype not in REDUCED_DTYPES:
        return feeds
    d = TORCH_DTYPES[dtype]
    return {k: v.to(d).float() if v.is_floating_point() else v for k, v in feeds.items()}


class Fp64Reference:
    """The torch steps in float64 on the CPU: exact arithmetic, to tell fp32 rounding from error.

    Built on first use (an fp64 copy of the model) and only consulted for an fp32 output that
    missed the max-abs gate; `fits` says whether that copy is small enough to make.
    """

    MAX_BYTES = 4 << 30

    def __init__(self, model: BltModel):
        self.model = model
        self._m64: BltModel | None = None

    @staticmethod
    def fits(model: BltModel) -> bool:
        return sum(p.numel() for p in model.parameters()) * 8 <= Fp64Reference.MAX_BYTES

    def __call__(self, step: str, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        from fastblt.export.reference import run_named_step

        if self._m64 is None:
            self._m64 = copy.deepcopy(self.model).to("cpu", torch.float64).eval()
        wide = {k: v.cpu().double() if v.is_floating_point() else v.cpu() for k, v in feeds.items()}
        with torch.no_grad():
            return run_named_step(self._m64, step, wide)


@dataclass
class GraphRun:
    """Options of one per-graph parity run."""

    reference: str = "torch"
    dtype: str = "float32"
    tolerances: Tolerances | None = None
    save_inputs: Path | None = None
    save_outputs: Path | None = None
    exact: Fp64Reference | None = None  # fp32 runs: judge a missed max-abs gate against fp64


def graph_parity(
    cases: list[Case],
    reference: Backend,
    candidates: dict[str, Backend],
    run: GraphRun,
    report: Report | None = None,
) -> Report:
    """Run every case on the reference and every candidate; compare each output.

    Entries land at report[(run.reference, candidate)][step][output][case label]. A candidate that
    raises on a case is a failed entry for that case (the message names graph and backend).
    """
    report = report if report is not None else Report()
    tolerances = run.tolerances or Tolerances.for_dtype(run.dtype)
    if not cases:
        report.error("per-graph parity: no cases to run")
        return report
    saver = _Saver(run.save_inputs, run.save_outputs)
    others = [n for n in candidates if n != "torch"]
    poly_pairs = [(a, b) for i, a in enumerate(others) for b in others[i + 1 :]]
    for case in cases:
        feeds = round_trip(case.make(), run.dtype)
        outs: dict[str, dict[str, Tensor]] = {}
        try:
            ref_out = host_copies(reference.run_step(case.step, cast_feeds(feeds, reference.specs[case.step])))
        except Exception as e:  # noqa: BLE001 - a reference that cannot run the case is reported, not raised
            report.error(f"{run.reference} | {case.step} | {case.label}: the reference raised {_one_line(e)}")
            continue
        for name, arr in ref_out.items():
            if not check_finite(arr):
                report.error(f"{run.reference} | {case.step} | {case.label} | {name}: reference is not finite")
        outs[f"reference:{run.reference}"] = ref_out  # distinct from a candidate of the same backend
        exact: dict[str, Tensor] | None = None
        for name, backend in candidates.items():
            pair = (run.reference, name)
            try:
                out = host_copies(backend.run_step(case.step, cast_feeds(feeds, backend.specs[case.step])))
            except Exception as e:  # noqa: BLE001 - reported as this graph's failure on this backend
                report.error(f"{name} | {case.step} | {case.label}: raised {_one_line(e)}")
                continue
            outs[name] = out
            for t in backend.specs[case.step].outputs:
                if t.name not in out:
                    report.error(f"{name} | {case.step} | {case.label}: output {t.name} missing")
                    continue
                res = compare(t.name, ref_out[t.name], out[t.name], tolerances.get(t.name))
                if not res.passed and run.exact is not None and run.dtype == "float32" and res.finite.passed:
                    if exact is None:
                        exact = run.exact(case.step, feeds)
                    tol = tolerances.get(t.name)
                    res = compare(t.name, ref_out[t.name], out[t.name], tol, exact=exact[t.name])
                report.add(pair, case.step, t.name, case.label, res)
        for a, b in poly_pairs:
            if a in outs and b in outs:
                _polygraphy_compare(report, (a, b), case, outs[a], outs[b], tolerances)
        saver.add(case, feeds, outs)
    saver.flush()
    return report


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# ------------------------------------------------------------------------------ polygraphy
@dataclass
class PolygraphyEntry:
    """A polygraphy `OutputCompareResult` (SimpleCompareFunc, check_error_stat="max") as a report entry."""

    name: str
    max_abs: float
    mean_abs: float
    max_rel: float
    atol: float
    passed: bool
    gate: str = "polygraphy SimpleCompareFunc max"

    def summary(self) -> str:
        return f"polygraphy: max_abs {self.max_abs:.3g} mean_abs {self.mean_abs:.3g} (atol {self.atol:g})"

    def failed_gates(self) -> list[str]:
        return [] if self.passed else [f"polygraphy max_absdiff {self.max_abs:.3g} > {self.atol:g}"]

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "max_abs": self.max_abs,
            "mean_abs": self.mean_abs,
            "max_rel": self.max_rel,
            "atol": self.atol,
            "comparator": self.gate,
        }


@contextlib.contextmanager
def quiet_polygraphy() -> Iterator[None]:
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        yield


def _polygraphy_compare(
    report: Report,
    pair: tuple[str, str],
    case: Case,
    a: dict[str, Tensor],
    b: dict[str, Tensor],
    tolerances: Tolerances,
) -> None:
    """Two non-reference candidates (e.g. ort vs trt) compared by polygraphy's Comparator."""
    from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult

    atol = {name: (tolerances.get(name).atol or 1e-2) for name in a}
    results = RunResults()
    results.append((pair[0], [IterationResult({k: to_numpy(v) for k, v in a.items()}, runner_name=pair[0])]))
    results.append((pair[1], [IterationResult({k: to_numpy(v) for k, v in b.items()}, runner_name=pair[1])]))
    with quiet_polygraphy():
        acc = Comparator.compare_accuracy(
            results, compare_func=SimpleCompareFunc(atol=atol, rtol=0.0, check_error_stat="max")
        )
    for name, res in acc[0][pair][0].items():
        entry = PolygraphyEntry(
            name, res.max_absdiff, res.mean_absdiff, res.max_reldiff, atol.get(name, 0.0), bool(res)
        )
        report.add(pair, case.step, name, case.label, entry)


class _Saver:
    """Collects feeds/outputs per step and writes them as polygraphy JSON at the end."""

    def __init__(self, inputs_dir: Path | None, outputs_dir: Path | None):
        self.inputs_dir, self.outputs_dir = inputs_dir, outputs_dir
        self.inputs: dict[str, list[dict]] = {}
        self.labels: dict[str, list[str]] = {}
        self.outputs: dict[str, dict[str, list]] = {}

    def add(self, case: Case, feeds: dict[str, Tensor], outs: dict[str, dict[str, Tensor]]) -> None:
        if self.inputs_dir is not None:
            self.inputs.setdefault(case.step, []).append({k: _savable(v) for k, v in feeds.items()})
            self.labels.setdefault(case.step, []).append(case.label)
        if self.outputs_dir is not None:
            per = self.outputs.setdefault(case.step, {})
            for runner, out in outs.items():
                per.setdefault(runner, []).append({k: _savable(v) for k, v in out.items()})

    def flush(self) -> None:
        from polygraphy.comparator import RunResults
        from polygraphy.comparator.struct import IterationResult
        from polygraphy.json import save_json

        if self.inputs_dir is not None:
            self.inputs_dir.mkdir(parents=True, exist_ok=True)
            with quiet_polygraphy():
                for step, feeds in self.inputs.items():
                    save_json(feeds, self.inputs_dir / f"inputs.{step}.json")
            (self.inputs_dir / "cases.json").write_text(json.dumps(self.labels, indent=1))
            _drop_stale(self.inputs_dir, "inputs", self.inputs)
        if self.outputs_dir is not None:
            self.outputs_dir.mkdir(parents=True, exist_ok=True)
            with quiet_polygraphy():
                for step, per in self.outputs.items():
                    rr = RunResults()
                    for runner, iters in per.items():
                        rr.append((runner, [IterationResult(o, runner_name=runner) for o in iters]))
                    rr.save(str(self.outputs_dir / f"outputs.{step}.json"))
            _drop_stale(self.outputs_dir, "outputs", self.outputs)


def _drop_stale(directory: Path, kind: str, steps: dict) -> None:
    """Remove `kind`.<step>.json of steps this run did not save (an earlier save's, replaced with
    --force): --load-inputs would replay them as if they were this run's."""
    for f in directory.glob(f"{kind}.*.json"):
        if f.name[len(kind) + 1 : -len(".json")] not in steps:
            f.unlink()


def _savable(x: Tensor):
    """numpy for every dtype numpy has; bf16 stays a torch tensor (polygraphy JSON encodes both)."""
    return x.detach().cpu() if x.dtype == torch.bfloat16 else x.detach().cpu().numpy()


def load_cases(inputs_dir: str | Path, specs: dict[str, StepSpec]) -> list[Case]:
    """Cases from a directory written by --save-inputs (polygraphy JSON feed lists per step)."""
    from polygraphy.json import load_json

    root = Path(inputs_dir)
    if not root.is_dir():
        raise InputError(f"--load-inputs {root}: not a directory")
    labels_file = root / "cases.json"
    try:
        labels = json.loads(labels_file.read_text()) if labels_file.is_file() else {}
    except (OSError, ValueError) as e:
        raise InputError(f"--load-inputs {labels_file}: unreadable ({e})") from None
    cases = []
    files = sorted(root.glob("inputs.*.json"))
    if not files:
        raise InputError(f"--load-inputs {root}: no inputs.<step>.json files")
    for f in files:
        step = f.name[len("inputs.") : -len(".json")]
        if step not in specs:
            raise InputError(f"--load-inputs {f}: graph {step!r} is not one of {sorted(specs)}")
        try:
            with quiet_polygraphy():
                feed_list = load_json(str(f))
        except Exception as e:  # noqa: BLE001 - any decode error is the file's fault
            raise InputError(f"--load-inputs {f}: not a polygraphy inputs file ({_one_line(e)})") from None
        names = labels.get(step, [])
        for i, feeds in enumerate(feed_list):
            tensors = {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, Tensor) else v for k, v in feeds.items()}
            tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
            try:
                check_feeds(reference_specs(specs)[step], tensors)
            except InputError as e:
                raise InputError(f"--load-inputs {f}: case {i} does not fit these graphs: {e}") from None
            label = f"loaded {names[i] if i < len(names) else f'#{i}'}"
            cases.append(Case(step, label, "loaded", _const(tensors)))
    return cases
