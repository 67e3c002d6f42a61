"""Export a model's step graphs into a directory, check them, write the manifest, atomically.

    options = ExportOptions(dtype="float16", capacity=4096)
    result = export_model(model, "artifacts/", options, checkpoint_hash=h)   # -> ExportResult
    check_export("artifacts/")                                             # re-run every check

Everything is written into a temporary directory next to `out` and renamed into place only once
every graph has passed its checks, so a failure (or Ctrl-C) leaves nothing half-written. An `out`
that already holds a different export is replaced only with `force`; the same checkpoint hash and
options make the export "up to date" and nothing is written.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastblt.errors import FastBltError, InputError, ManifestMismatch
from fastblt.export import checks as checks_mod
from fastblt.export.checks import CheckResult, ExportCheckFailed, check_graph, failures
from fastblt.export.graphs import GraphRecord, dim_ranges, export_step, materialized, step_parameter_names
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
from fastblt.export.spec import TORCH_DTYPES, StepSpec, float_dtype, step_specs
from fastblt.formats.files import replace_dir, staging_dir
from fastblt.model.blt import BltModel
from fastblt.model.config import BltConfig

# 18 is the torch exporter's floor (torchlib), 20 its default and the highest opset TensorRT 10.0
# parses; ONNX >= 21 ops (Attention, RMSNormalization, TensorScatter) are not used by these graphs.
OPSETS = (18, 19, 20)
DEFAULT_OPSET = 20
MIN_CAPACITY = 8  # room for the example sizes the exporter traces with
EXTERNAL_DATA_BYTES = 64 << 20  # graphs with more initializer bytes keep them in <file>.data


@dataclass(frozen=True)
class ExportOptions:
    """What an export is keyed by (with the checkpoint hash): same options -> same graphs."""

    dtype: str = "float32"  # "float32" | "float16" | "bfloat16" (or fp32/fp16/bf16)
    opset: int = DEFAULT_OPSET
    capacity: int = 4096  # static byte-cache capacity C (max context in bytes)
    patch_capacity: int | None = None  # static patch-cache capacity; None -> capacity
    max_batch: int = 8  # upper bound of the dynamic batch dim (TensorRT profiles)
    external_data_bytes: int = field(default=EXTERNAL_DATA_BYTES, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", float_dtype(self.dtype))
        if self.opset not in OPSETS:
            raise InputError(
                f"opset {self.opset}: unsupported; choose one of {', '.join(map(str, OPSETS))} "
                "(18 = the torch exporter's floor, 20 = the highest TensorRT 10.0 parses)"
            )
        if self.patch_capacity is None:
            object.__setattr__(self, "patch_capacity", self.capacity)
        for name in ("capacity", "patch_capacity"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < MIN_CAPACITY:
                raise InputError(f"{name} {v!r}: expected an int >= {MIN_CAPACITY}")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise InputError(f"max_batch {self.max_batch!r}: expected an int >= 1")

    def key(self) -> dict:
        """The options as recorded in (and compared against) the manifest."""
        d = asdict(self)
        d.pop("external_data_bytes")
        return d

    def specs(self, config: BltConfig) -> dict[str, StepSpec]:
        return step_specs(config, self.capacity, self.patch_capacity, self.dtype)


@dataclass
class ExportResult:
    out: Path
    manifest: dict
    up_to_date: bool
    seconds: float


# progress events: ("start" | "exported", step, index, total, None), then ("done", step, index, total, entry)
Progress = Callable[[str, str, int, int, dict | None], None]
# Makes one step's weights available while it exports (default: they already are)
StepWeights = Callable[[str], contextlib.AbstractContextManager]


def existing_export(out: Path, checkpoint_hash: str | None, options: ExportOptions) -> str | None:
    """What `out` holds: None (nothing / empty dir), "same" (this checkpoint and these options,
    files intact) or a one-line description of why it is a different export."""
    out = Path(out)
    if not out.exists():
        return None
    if not out.is_dir():
        return f"{out} is a file"
    if not (out / MANIFEST).exists():
        entries = sorted(p.name for p in out.iterdir())
        return f"{out} holds other files ({', '.join(entries[:5])})" if entries else None
    try:
        manifest = read_manifest(out)
        verify_files(out, manifest)
    except ManifestMismatch as e:
        return f"its export is unreadable or changed ({e})"
    old_hash = manifest["checkpoint"].get("hash")
    if old_hash != checkpoint_hash:
        return f"it was exported from checkpoint {str(old_hash)[:12]}, not {str(checkpoint_hash)[:12]}"
    diff = [
        f"{k} {manifest['options'].get(k)!r} -> {v!r}"
        for k, v in options.key().items()
        if manifest["options"].get(k) != v
    ]
    if diff:
        return "its options differ: " + ", ".join(diff)
    if manifest.get("versions", {}).get("fastblt") != versions()["fastblt"]:
        return f"it was written by fastblt {manifest.get('versions', {}).get('fastblt')}"
    return "same"


def export_model(
    model: BltModel,
    out: str | Path,
    options: ExportOptions,
    checkpoint_hash: str | None = None,
    checkpoint_source: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    step_weights: StepWeights | None = None,
) -> ExportResult:
    """Export every step graph of `model` (weights already in `options.dtype`) into `out`.

    Raises ExportCheckFailed when a graph fails a check, ManifestMismatch when `out` holds a
    different export and not `force`; in both cases nothing under `out` changes.
    """
    t0 = time.perf_counter()
    out = Path(out).expanduser()
    status = existing_export(out, checkpoint_hash, options)
    if status == "same":
        return ExportResult(out, read_manifest(out), True, time.perf_counter() - t0)
    if status is not None and not force:
        raise ManifestMismatch(f"{out}: already holds a different export ({status}); pass --force to replace it")
    _check_model_dtype(model, options.dtype)
    config = model.config
    specs = options.specs(config)
    ranges = dim_ranges(options.capacity, options.patch_capacity, options.max_batch, config.patching.max_patch_length)
    tmp = staging_dir(out, "export")
    try:
        graphs = _export_graphs(model, tmp, specs, options, ranges, progress, step_weights)
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
    except (FastBltError, TypeError) as e:
        raise ManifestMismatch(f"{where}: field checkpoint.config/options: unreadable ({e})") from None
    specs = options.specs(config)
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
    model: BltModel,
    tmp: Path,
    specs: dict[str, StepSpec],
    options: ExportOptions,
    ranges: dict,
    progress: Progress | None,
    step_weights: StepWeights | None,
) -> dict[str, dict]:
    """Export and check each graph in turn; the first failed check stops the export."""
    graphs = {}
    for i, (step, spec) in enumerate(specs.items()):
        if progress:
            progress("start", step, i, len(specs), None)
        with (step_weights or _nothing)(step):
            record = export_step(model, spec, tmp / f"{step}.onnx", options.opset, ranges, options.external_data_bytes)
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
            "caches": "past.* inputs are static-capacity buffers (slot j = position j, `start` valid); "
            "present.* outputs hold only the new entries, written by the caller at start..start+S-1",
            "precision": "norms, softmax, RoPE, entropies and logits are float32 inside every graph",
        },
        "graphs": graphs,
    }


@contextlib.contextmanager
def _nothing(step: str) -> Iterator[None]:
    yield


def mapped_model(path: str | Path, dtype: torch.dtype, options: ExportOptions) -> tuple[BltModel, StepWeights]:
    """A meta-device model of the checkpoint at `path` and the `step_weights` that give one step
    graph its weights (read from the mapped files, cast to `dtype`) while that graph exports.

    Peak memory is then about the largest graph's weights in `dtype`, not the whole model: what a
    BLT-1B export needs on a machine smaller than its fp32 weights.
    """
    from fastblt.formats.checkpoint import load_mapped

    config, state = load_mapped(path)
    with torch.device("meta"):
        model = BltModel(config).to(dtype).eval()
    specs = options.specs(config)

    def step_weights(step: str):
        return materialized(model, step_parameter_names(model, specs[step]), lambda name, _: state[name].to(dtype))

    return model, step_weights


def _check_model_dtype(model: BltModel, dtype: str) -> None:
    want = TORCH_DTYPES[dtype]
    wrong = {str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != want}
    if wrong:
        raise InputError(f"model weights are {sorted(wrong)}, expected {want} for a {dtype} export (cast it first)")


def _graph_entry(
    tmp: Path, record: GraphRecord, spec: StepSpec, options: ExportOptions, results: list[CheckResult], check_s: float
) -> dict:
    entry = {"file": record.file, "external_data": record.external_data}
    cache_capacity = options.patch_capacity if spec.stack == "global" else options.capacity
    return {
        **entry,
        "sha256": {name: sha256_file(tmp / name) for name in graph_files(entry)},
        "bytes": record.bytes,
        "opset": options.opset,
        "stack": spec.stack,
        "cache_capacity": cache_capacity,
        "patch_capacity": options.patch_capacity,
        **spec.to_dict(),
        "op_counts": record.op_counts,
        "nodes": sum(record.op_counts.values()),
        "initializer_bytes": record.initializer_bytes,
        "export_seconds": round(record.seconds, 3),
        "check_seconds": round(check_s, 3),
        "checks": {r.check: r.to_dict() for r in results},
    }
