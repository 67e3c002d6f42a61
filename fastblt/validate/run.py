"""`validate`: everything `fastblt validate` does, as a function that returns a Report.

    report = validate(ValidateOptions(checkpoint="default", backends=("torch", "ort")))
    bool(report)        # the verdict
    report.save("out/") # report.md, report.json, error_per_layer.png

With `reference="torch"` (default): per-graph parity of every candidate backend against the torch
fp32 reference (random and prompt-derived feeds), per-layer localisation of every failed graph,
and greedy generation in every mode end to end. With `reference="hf"`: our torch reference
against transformers' BltForCausalLM on the same weights (logits and greedy output).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastblt.engines.base import Backend, resolve_device
from fastblt.engines.registry import BACKENDS, available, backend_factory
from fastblt.errors import BackendUnavailable, InputError, ManifestMismatch
from fastblt.export.spec import (
    DEFAULT_MAX_STEP,
    FLOAT_DTYPES,
    TORCH_DTYPES,
    StepSpec,
    float_dtype,
    max_step,
    step_specs,
)
from fastblt.model.blt import BltModel
from fastblt.model.config import BltConfig
from fastblt.validate.e2e import MODES, E2ERun, e2e_parity
from fastblt.validate.graphs import (
    DEFAULT_PROMPTS,
    Case,
    Fp64Reference,
    GraphRun,
    cast_feeds,
    graph_parity,
    load_cases,
    random_cases,
    real_cases,
    reference_specs,
    round_trip,
)
from fastblt.validate.layers import localise_onnx, localise_torch
from fastblt.validate.metrics import FP64_WORDS, Tolerances
from fastblt.validate.report import Report, environment

DEFAULT_BACKENDS = ("torch", "ort")  # what a CPU runs; trt only when asked for
ARTIFACT_BACKENDS = ("ort", "trt")


@dataclass(frozen=True)
class ValidateOptions:
    """What `fastblt validate` runs. None fields take the defaults described per field."""

    checkpoint: str | Path = "default"
    artifacts: Path | None = None  # None with ort/trt: export once into cache_dir (keyed by hash)
    backends: tuple[str, ...] | None = None  # None: DEFAULT_BACKENDS
    reference: str = "torch"  # "torch" | "hf"
    dtype: str | None = None  # None: the artifacts' dtype, else float32
    prompts: tuple[str, ...] | None = None  # None: DEFAULT_PROMPTS
    graphs: tuple[str, ...] | None = None  # steps to compare; None: all
    modes: tuple[str, ...] = MODES
    max_bytes: int = 32  # e2e bytes per generation
    hf_greedy_bytes: int = 32
    max_step: int = DEFAULT_MAX_STEP  # positions per step call when no artifacts fix it
    real: bool = True  # prompt-derived feeds as well as random ones
    e2e: bool = True
    layers: bool = True  # localise failed graphs per layer
    seed: int = 0
    threads: int | None = None
    device: str | None = None  # candidates torch / trt compute here; the reference stays on the CPU
    atol: float | None = None  # fp32 max-abs gate; None: 1e-4 (docs/validation.md)
    save_inputs: Path | None = None
    load_inputs: Path | None = None
    save_outputs: Path | None = None
    cache_dir: Path | None = None
    force: bool = False  # save_inputs / save_outputs may hold files (earlier saves there are replaced)
    extra_candidates: dict[str, Backend] = field(default_factory=dict, compare=False)  # API/tests only

    def __post_init__(self) -> None:
        if self.reference not in ("torch", "hf"):
            raise InputError(f"--reference {self.reference!r}: expected torch or hf")
        if self.reference == "hf":
            _check_hf_only(self)
        if self.dtype is not None:
            object.__setattr__(self, "dtype", float_dtype(self.dtype, "--dtype"))
        if self.backends is None:
            object.__setattr__(self, "backends", DEFAULT_BACKENDS)
        else:
            unknown = [b for b in self.backends if b not in BACKENDS]
            if unknown or not self.backends:
                raise InputError(f"--backends {','.join(self.backends)}: choose from {', '.join(BACKENDS)}")
        bad_modes = [m for m in self.modes if m not in MODES]
        if bad_modes:
            raise InputError(f"--modes {','.join(bad_modes)}: unknown; choose from {', '.join(MODES)}")
        if self.reference == "hf" and self.dtype not in (None, "float32"):
            raise InputError(
                f"--reference hf compares in fp32 (transformers' reference path), not {short_dtype(self.dtype)}"
            )
        if self.device is not None:
            resolve_device(self.device)  # InputError now, not a backend error later
        if self.max_bytes < 1 or self.max_step < 16:
            raise InputError("--max-bytes must be >= 1 and --max-step >= 16")
        for flag, directory in (("--save-inputs", self.save_inputs), ("--save-outputs", self.save_outputs)):
            if directory is not None:
                check_out_dir(flag, Path(directory), self.force)


# What only the torch reference runs: with --reference hf nothing reads them, so given they would
# be silently ignored (--backends ort --artifacts art/ reporting PASS without running ort).
TORCH_REFERENCE_ONLY = {
    "artifacts": "--artifacts",
    "backends": "--backends",
    "graphs": "--graphs",
    "atol": "--atol",
    "device": "--device",
    "save_inputs": "--save-inputs",
    "load_inputs": "--load-inputs",
    "save_outputs": "--save-outputs",
    "cache_dir": "--cache-dir",
}


def _check_hf_only(opts: ValidateOptions) -> None:
    given = [flag for name, flag in TORCH_REFERENCE_ONLY.items() if getattr(opts, name) is not None]
    if opts.extra_candidates:
        given.append("extra_candidates")
    if given:
        raise InputError(hf_refusal(given))


def hf_refusal(flags: list[str]) -> str:
    """The one-line refusal of torch-reference `flags` given with --reference hf."""
    verb = "is" if len(flags) == 1 else "are"
    return (
        f"--reference hf compares our torch reference with transformers only; {', '.join(flags)} {verb} "
        "for --reference torch (run validate once per reference)"
    )


def short_dtype(dtype: str) -> str:
    """fp16 for float16: the name --dtype takes."""
    return next((short for short, full in FLOAT_DTYPES.items() if full == dtype), dtype)


def blocked_by(flag: str, directory: Path) -> None:
    """InputError when `directory`, or the nearest of its parents that exists, is not a directory
    (found now, not by the write at the end of the run)."""
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        what = "exists and is not a directory" if existing == directory else f"{existing} is not a directory"
        raise InputError(f"{flag} {directory}: {what}")


def check_out_dir(flag: str, directory: Path, force: bool) -> None:
    """InputError unless `directory` is new, empty, or (with `force`) a directory: checked before
    any work, so a user's files are neither mixed with ours nor found in the way at the end."""
    blocked_by(flag, directory)
    if not directory.exists():
        return
    held = sorted(p.name for p in directory.iterdir())
    if held and not force:
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        raise InputError(f"{flag} {directory}: not empty ({shown}); pass --force to write into it")


def validate(opts: ValidateOptions, model: BltModel | None = None, log: Callable[[str], None] | None = None) -> Report:
    """Run every check `opts` asks for; never raises for a failed gate (the report says so).

    `log` receives one line per phase (the CLI prints them on stderr); None: silent.

    Raises FastBltError subclasses for bad input: an unreadable checkpoint, artifacts exported
    from another checkpoint (ManifestMismatch), options that contradict the artifacts.
    """
    from fastblt.formats.checkpoint import load_checkpoint, resolve_checkpoint_path

    path = None
    if model is None:
        path = resolve_checkpoint_path(opts.checkpoint)
        model = load_checkpoint(path)
    model = model.float().eval()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    prompts = list(opts.prompts or DEFAULT_PROMPTS)
    report = Report()
    report.meta.update(
        {
            "checkpoint": str(path) if path is not None else "(model object)",
            "reference": opts.reference,
            "environment": environment(),
        }
    )
    if opts.reference == "hf":
        from fastblt.validate.hf import hf_model, hf_parity

        report.meta["dtype"] = "float32"
        hf = hf_model(model, path)
        return hf_parity(model, hf, prompts, opts.hf_greedy_bytes, report=report)
    return _validate_torch_reference(opts, model, path, prompts, report, log or _silent)


def _silent(_: str) -> None:
    return None


def _validate_torch_reference(
    opts: ValidateOptions,
    model: BltModel,
    path: Path | None,
    prompts: list[str],
    report: Report,
    log: Callable[[str], None],
) -> Report:
    runnable = _runnable(opts.backends, report)
    artifacts, manifest = None, None
    if any(b in ARTIFACT_BACKENDS for b in runnable):
        artifacts, manifest = _artifacts(opts, model, path, log)
    specs, dtype = _specs(opts, model.config, manifest)
    unknown = [g for g in opts.graphs or () if g not in specs]
    if unknown:
        raise InputError(f"--graphs {','.join(unknown)}: not graphs of this checkpoint ({', '.join(specs)})")
    tolerances = Tolerances.for_dtype(dtype, opts.atol)
    report.meta.update(
        {
            "artifacts": str(artifacts) if artifacts else None,
            "checkpoint_hash": manifest["checkpoint"].get("hash") if manifest else None,
            "dtype": dtype,
            "max_step": max_step(specs),
            "slots": {spec.stack: spec.slots for spec in specs.values()},
            "backends_requested": list(opts.backends),
            "gates": tolerances.get("").describe(),
            "atol": tolerances.get("").atol,
        }
    )
    cand_model = _model_in(model, dtype)
    candidates = _candidates(runnable, specs, cand_model, artifacts, opts.threads, report, opts.device)
    candidates.update(opts.extra_candidates)
    report.meta["backends_run"] = list(candidates)
    if not candidates:
        report.error("no backend could run: nothing was compared (see skipped)")
        return report
    cases = _cases(opts, model, specs, prompts)
    report.meta["cases"] = {s: sum(c.step == s for c in cases) for s in specs if any(c.step == s for c in cases)}
    exact = Fp64Reference(model) if dtype == "float32" and Fp64Reference.fits(model) else None
    report.meta["fp64_check"] = exact is not None
    if exact is not None:
        report.meta["gates"] += f"; a missed max_abs is judged against fp64 ({FP64_WORDS})"
    run = GraphRun(
        dtype=dtype,
        tolerances=tolerances,
        save_inputs=opts.save_inputs,
        save_outputs=opts.save_outputs,
        exact=exact,
    )
    log(f"per graph: {len(cases)} cases x {', '.join(candidates)} against torch fp32 ({dtype})")
    graph_parity(cases, _backend("torch", reference_specs(specs), model, None, opts.threads), candidates, run, report)
    if opts.layers and report.failed_graphs():
        log("per layer: localising the failed graphs")
        _localise(report, cases, model, cand_model, specs, candidates, tolerances, dtype)
    if opts.e2e:
        log(f"end to end: greedy {', '.join(opts.modes)} on {', '.join(candidates)}, {len(prompts)} prompts")
        e2e_run = E2ERun(modes=opts.modes, max_bytes=opts.max_bytes, dtype=dtype, tolerances=tolerances)
        ref_e2e = _backend("torch", reference_specs(specs), model, None, opts.threads)
        e2e_parity(model, ref_e2e, candidates, prompts, e2e_run, report)
    for b in candidates.values():
        b.deactivate()
    return report


def _runnable(requested: tuple[str, ...], report: Report) -> list[str]:
    """The requested backends that can run here; the others are skipped with the reason."""
    avail = available()
    runnable = []
    for name in requested:
        a = avail.get(name)
        if a is None or not a.available:
            report.skip(name, a.reason if a is not None else "unknown backend")
        else:
            runnable.append(name)
    return runnable


def _candidates(
    names: list[str],
    specs: dict[str, StepSpec],
    model: BltModel,
    artifacts: Path | None,
    threads: int | None,
    report: Report,
    device: str | None = None,
) -> dict[str, Backend]:
    """Start each candidate backend. One that cannot load the graphs is an error of the report,
    unless it cannot run here (BackendUnavailable: no TensorRT; bf16 graphs on onnxruntime's CPU
    build, which has no bf16 kernels): skipped, with why."""
    candidates = {}
    for name in names:
        try:
            backend = _backend(name, specs, model, artifacts, threads, device)
            # a torch candidate on a GPU is not the reference: say where it ran
            candidates[name if backend.device.type == "cpu" or name != "torch" else f"torch@{backend.device}"] = backend
        except BackendUnavailable as e:
            report.skip(name, str(e))
        except Exception as e:  # noqa: BLE001 - a backend that cannot load the graphs is a finding
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            report.error(f"backend {name} could not load the artifacts: {why}")
    return candidates


# ------------------------------------------------------------------------------ helpers
def _model_in(model: BltModel, dtype: str) -> BltModel:
    if dtype == "float32":
        return model
    return copy.deepcopy(model).to(TORCH_DTYPES[dtype]).eval()


def _backend(
    name: str,
    specs: dict[str, StepSpec],
    model: BltModel,
    artifacts: Path | None,
    threads: int | None,
    device: str | None = None,
) -> Backend:
    factory = backend_factory(name)
    if name == "torch":
        return factory(specs, model, threads=threads, device=device).activate()
    if artifacts is None:
        raise BackendUnavailable(f"backend {name}: needs exported artifacts (--artifacts DIR)")
    extra = {"device": device} if name == "trt" and device is not None else {}
    return factory(specs, artifacts, threads=threads, **extra).activate()


def _specs(opts: ValidateOptions, config: BltConfig, manifest: dict | None) -> tuple[dict[str, StepSpec], str]:
    """The step specs every candidate runs (the artifacts' when there are any) and their dtype."""
    if manifest is None:
        dtype = opts.dtype or "float32"
        return step_specs(config, opts.max_step, dtype), dtype
    from fastblt.export.options import ExportOptions

    mopts = manifest["options"]
    if opts.dtype is not None and opts.dtype != mopts["dtype"]:
        want, have = short_dtype(opts.dtype), short_dtype(mopts["dtype"])
        raise ManifestMismatch(
            f"--dtype {want}: the artifacts were exported in {have}; "
            f"pass --dtype {have} (or leave it out), or export again with --dtype {want}"
        )
    eo = ExportOptions(**{k: mopts[k] for k in ("dtype", "opset", "max_step", "max_batch")})
    return eo.specs(config), eo.dtype


def _artifacts(
    opts: ValidateOptions, model: BltModel, path: Path | None, log: Callable[[str], None]
) -> tuple[Path, dict]:
    """The export directory to validate (given, or the export cache's entry, exported once) and its
    manifest, checked against the checkpoint: the same config, and the same hash when it is known."""
    from fastblt.export.cache import cached_export, source_hash
    from fastblt.export.manifest import MANIFEST, read_manifest, verify_source
    from fastblt.export.options import ExportOptions

    ckpt_hash = source_hash(model, path) if path is not None else None
    if opts.artifacts is None:
        options = ExportOptions(dtype=opts.dtype or "float32", max_step=opts.max_step)
        source = str(path) if path is not None else "in-memory model"

        def notice(out: Path) -> None:
            log(f"artifacts: none given; exporting to {out} (reused while the checkpoint and options are the same)")

        key = ckpt_hash or source_hash(model, None)
        directory = cached_export(model, key, options, source, cache_dir=opts.cache_dir, notice=notice)
    else:
        directory = Path(opts.artifacts).expanduser()
        if not directory.is_dir():
            raise InputError(f"--artifacts {directory}: not a directory")
    manifest = read_manifest(directory)
    verify_source(manifest, model.config.to_dict(), directory / MANIFEST, ckpt_hash)
    return directory, manifest


def _artifacts_dir(backend: Backend | None) -> Path | None:
    """The export directory a backend runs (following wrappers' `inner`), if any."""
    while backend is not None:
        if getattr(backend, "artifacts_dir", None) is not None:
            return Path(backend.artifacts_dir)
        backend = getattr(backend, "inner", None)
    return None


def _cases(opts: ValidateOptions, model: BltModel, specs: dict[str, StepSpec], prompts: list[str]) -> list[Case]:
    if opts.load_inputs is not None:
        cases = load_cases(opts.load_inputs, specs)
    else:
        cases = random_cases(specs, model, seed=opts.seed, steps=opts.graphs)
        if opts.real:
            cases += real_cases(model, specs, prompts)
    if opts.graphs:
        kept = [c for c in cases if c.step in opts.graphs]
        if opts.load_inputs is not None and cases and not kept:
            held = sorted({c.step for c in cases})
            raise InputError(f"--load-inputs {opts.load_inputs}: holds inputs of {', '.join(held)}, "
                             f"none of --graphs {','.join(opts.graphs)}")  # fmt: skip
        cases = kept
    return cases


def _localise(
    report: Report,
    cases: list[Case],
    model: BltModel,
    cand_model: BltModel,
    specs: dict[str, StepSpec],
    candidates: dict[str, Backend],
    tolerances: Tolerances,
    dtype: str,
) -> None:
    """Per-layer localisation of every failed (pair, graph) on its first failing case: the torch
    candidate by hooks on both models, a backend with artifacts (ort, trt) by its ONNX graph in ORT."""
    from fastblt.export.manifest import read_manifest

    by_label = {(c.step, c.label): c for c in cases}
    tol = tolerances.get("")
    for pair, graph in report.failed_graphs():
        if graph not in specs:
            continue  # e2e / hf entries are not graphs
        _, cand = pair
        label = next((case for out in report[pair][graph].values() for case, e in out.items() if not e.passed), None)
        case = by_label.get((graph, label))
        if case is None:
            continue
        feeds32 = round_trip(case.make(), dtype)
        feeds = cast_feeds(feeds32, specs[graph])
        atol = tol.atol if tol.atol is not None else 1e-2
        try:
            backend = candidates.get(cand)
            artifacts = _artifacts_dir(backend)
            if cand == "torch":
                lr = localise_torch(model, cand_model, graph, feeds32, feeds, label, atol, tol.cosine)
            elif artifacts is not None:
                onnx_path = Path(artifacts) / read_manifest(Path(artifacts))["graphs"][graph]["file"]
                lr = localise_onnx(model, graph, onnx_path, feeds, label, atol, tol.cosine)
            else:
                report.skip(f"per-layer {cand} | {graph}", "the backend has no ONNX artifacts to localise in")
                continue
        except Exception as e:  # noqa: BLE001 - localisation is a diagnosis: its failure is reported, not fatal
            report.error(f"per-layer localisation of {pair[1]} | {graph} could not run: {type(e).__name__}: {e}")
            continue
        report.layers[(pair, graph)] = lr
