"""Export a model's step graphs into a directory, check them, write the manifest, atomically.

    options = ExportOptions(dtype="float16")
    result = export_model(model, "artifacts/", options, checkpoint_hash=h)   # -> ExportResult
    check_export("artifacts/")                                             # re-run every check

Everything is written into a temporary directory next to `out` and renamed into place only once
every graph has passed its checks, so a failure (or Ctrl-C) leaves nothing half-written. An `out`
that already holds a different export is replaced only with `force`; the same checkpoint hash and
options make the export "up to date" and nothing is written.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastblt.errors import FastBltError, InputError, ManifestMismatch
from fastblt.export import checks as checks_mod
from fastblt.export.checks import CheckResult, ExportCheckFailed, check_graph, failures
from fastblt.export.graphs import GraphRecord, Weights, export_step, model_weights
from fastblt.export.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    graph_files,
    read_manifest,
    sha256_file,
    verify_files,
    verify_specs,
    versions,
    write_manifest,
)
from fastblt.export.options import ExportOptions, Progress, existing_export, refusal
from fastblt.export.spec import TORCH_DTYPES, StepSpec, dim_ranges
from fastblt.formats.files import replace_dir, staging_dir, utf8_path
from fastblt.model.blt import BltModel
from fastblt.model.config import BltConfig


@dataclass
class ExportResult:
    out: Path
    manifest: dict
    up_to_date: bool
    seconds: float


def export_model(
    model: BltModel | BltConfig,
    out: str | Path,
    options: ExportOptions,
    checkpoint_hash: str | None = None,
    checkpoint_source: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    weights: Weights | None = None,
) -> ExportResult:
    """Export every step graph of `model` (weights already in `options.dtype`) into `out`.

    Instead of a model, a config with `weights` (each parameter by name, in `options.dtype`:
    `mapped_weights` reads them from a checkpoint's files one graph at a time).
    Raises ExportCheckFailed when a graph fails a check, ManifestMismatch when `out` holds a
    different export and not `force`; in both cases nothing under `out` changes.
    """
    t0 = time.perf_counter()
    out = utf8_path(Path(out).expanduser(), "export directory")
    status = existing_export(out, checkpoint_hash, options)
    if status == "same":
        return ExportResult(out, read_manifest(out), True, time.perf_counter() - t0)
    if status is not None and not force:
        raise ManifestMismatch(refusal(out, status))
    if weights is None:
        _check_model_dtype(model, options.dtype)
        weights = model_weights(model)
    config = model if isinstance(model, BltConfig) else model.config
    specs = options.specs(config)
    ranges = dim_ranges(config, options.max_step, options.max_batch)
    tmp = staging_dir(out, "export")
    try:
        graphs = _export_graphs(config, weights, tmp, specs, options, progress)
        manifest = _manifest(config, options, ranges, graphs, checkpoint_hash, checkpoint_source)
        write_manifest(tmp, manifest)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, manifest, False, time.perf_counter() - t0)


def check_export(directory: str | Path, progress: Progress | None = None) -> dict[str, list[CheckResult]]:
    """Re-run every check on an export directory. Per graph: `files` (present, sha256 as in the
    manifest), then the graph checks against the spec that the manifest's config and options give.

    Raises ManifestMismatch when `directory` holds no readable manifest, or the manifest's graphs
    are not the ones its own config and options describe.
    """
    directory = Path(directory).expanduser()
    manifest = read_manifest(directory)
    where = str(directory / MANIFEST)
    try:
        config = BltConfig.from_dict(manifest["checkpoint"]["config"])
        options = ExportOptions(**manifest["options"])
        specs = options.specs(config)  # refuses options no export has, e.g. max_step under a diffusion block
    except (FastBltError, TypeError) as e:
        raise ManifestMismatch(f"{where}: field checkpoint.config/options: unreadable ({e})") from None
    verify_specs(manifest, specs, where)
    results = {}
    for i, (step, spec) in enumerate(specs.items()):
        if progress:
            progress("start", step, i, len(specs), None)
        try:
            verify_files(directory, manifest, [step])
            files = CheckResult("files", "pass", "present, sha256 as in the manifest")
        except ManifestMismatch as e:
            files = CheckResult("files", "fail", str(e))
        results[step] = [files]
        if (directory / manifest["graphs"][step]["file"]).is_file():
            results[step] += check_graph(directory / manifest["graphs"][step]["file"], spec, options.opset)
        if progress:
            progress("done", step, i, len(specs), {"checks": {r.check: r.to_dict() for r in results[step]}})
    return results


# ------------------------------------------------------------------------------ helpers
def _export_graphs(
    config: BltConfig,
    weights: Weights,
    tmp: Path,
    specs: dict[str, StepSpec],
    options: ExportOptions,
    progress: Progress | None,
) -> dict[str, dict]:
    """Export and check each graph in turn; the first failed check stops the export."""
    graphs = {}
    for i, (step, spec) in enumerate(specs.items()):
        if progress:
            progress("start", step, i, len(specs), None)
        path = tmp / f"{step}.onnx"
        record = export_step(config, spec, weights, path, options.dtype, options.external_data_bytes)
        if progress:
            progress("exported", step, i, len(specs), None)
        t1 = time.perf_counter()
        results = check_graph(tmp / record.file, spec, options.opset)
        graphs[step] = _graph_entry(tmp, record, spec, options, results, time.perf_counter() - t1)
        if progress:
            progress("done", step, i, len(specs), graphs[step])
        bad = failures(results)
        if bad:
            raise ExportCheckFailed(
                f"graph {step}: failed check(s) " + "; ".join(f"{r.check}: {r.detail}" for r in bad), {step: results}
            )
    return graphs


def _manifest(
    config: BltConfig, options: ExportOptions, ranges: dict, graphs: dict, ckpt_hash: str | None, source: str | None
) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "checkpoint": {"hash": ckpt_hash, "source": source, "config": config.to_dict()},
        "options": options.key(),
        "dims": {name: r.to_dict() for name, r in ranges.items()},
        "versions": versions(),
        "trt_ops": {"source": checks_mod.load_trt_ops().source, "file": "fastblt/export/trt_ops.txt"},
        "notes": {
            "opset": f"opset {options.opset}: every op is in TensorRT's list (opset 9-24) and runs in "
            "onnxruntime; 20 is the highest TensorRT 10.0 parses and the torch exporter's default",
            "caches": "past.* inputs are (batch, heads, slots, head_dim) caches; windowed stacks keep rings of "
            "window + max_step slots (position p in slot p mod slots), the global stack a linear cache of `past` "
            "slots; present.* outputs are the same buffers, written in place (bind them to the inputs' memory); "
            "cross.* is the decoder's ring of patch keys/values (patch p in slot p mod its size)",
            "precision": "norms, softmax, RoPE, entropies and logits are float32 inside every graph",
        },
        "graphs": graphs,
    }


def mapped_weights(path: str | Path, dtype: torch.dtype) -> tuple[BltConfig, Weights]:
    """The config of the checkpoint at `path` and its Weights, read from the mapped files and cast
    to `dtype` only when a graph asks for them.

    Peak memory is then about the largest graph's weights in `dtype`, not the whole model: what a
    BLT-1B export needs on a machine smaller than its fp32 weights.
    """
    from fastblt.formats.checkpoint import load_mapped

    config, state = load_mapped(path)
    return config, lambda name: state[name].to(dtype)


def _check_model_dtype(model: BltModel, dtype: str) -> None:
    want = TORCH_DTYPES[dtype]
    wrong = {str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != want}
    if wrong:
        raise InputError(f"model weights are {sorted(wrong)}, expected {want} for a {dtype} export (cast it first)")


def _graph_entry(
    tmp: Path, record: GraphRecord, spec: StepSpec, options: ExportOptions, results: list[CheckResult], check_s: float
) -> dict:
    entry = {"file": record.file, "external_data": record.external_data}
    return {
        **entry,
        "sha256": {name: sha256_file(tmp / name) for name in graph_files(entry)},
        "bytes": record.bytes,
        "opset": options.opset,
        **spec.to_dict(),
        "op_counts": record.op_counts,
        "nodes": sum(record.op_counts.values()),
        "initializer_bytes": record.initializer_bytes,
        "export_seconds": round(record.seconds, 3),
        "check_seconds": round(check_s, 3),
        "checks": {r.check: r.to_dict() for r in results},
    }
