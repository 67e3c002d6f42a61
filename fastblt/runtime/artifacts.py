"""Exported artifacts for the graph backends (ort, trt): find or make them, and prove they match.

- `artifacts=DIR`: the manifest decides the dtype and the capacities. The artifacts must come from
  this checkpoint: the manifest's config must equal the checkpoint's, and its checkpoint hash must
  equal the checkpoint directory's (`checkpoint_hash`) or the in-memory model's (`model_hash`).
  A model given in memory whose hash the manifest does not record is probed instead: a short
  prompt through the graphs and through the torch steps must give the same logits.
- `artifacts=None`: exported on first use (fp32, for the CPU) into
  `<cache_dir>/<checkpoint hash[:16]>/<dtype>-<capacity>/`; a later call finds it up to date.

The runtime reaches exports only through fastblt.export's public functions, and backends only
through the engines registry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fastblt.errors import InputError, ManifestMismatch
from fastblt.export.manifest import MANIFEST, read_manifest
from fastblt.export.spec import step_specs
from fastblt.model.blt import BltModel

if TYPE_CHECKING:
    from fastblt.runtime.generator import Generator, _Engine

DEFAULT_CACHE = Path("~/.cache/fastblt")
PROBE_IDS = [1, *range(40, 72)]  # BOS + 32 bytes: several patches, no special ids
PROBE_ATOL = {"float32": 1e-3}  # reduced precision: compared by argmax agreement instead


def model_hash(model: BltModel) -> str:
    """sha256 over the config and every tensor of the state dict (name, dtype, shape, bytes)."""
    h = hashlib.sha256(b"fastblt-model\0")
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def source_hash(g: Generator) -> str:
    """The hash exports of this Generator's checkpoint are keyed by."""
    if g.checkpoint_path is not None:
        from fastblt.model.checkpoint import checkpoint_hash

        return checkpoint_hash(g.checkpoint_path)
    return model_hash(g.model)


def engine_from_artifacts(g, backend: str, factory, artifacts, max_context, threads, cache_dir, extra=None) -> _Engine:
    """The _Engine of a graph backend: artifacts checked against the checkpoint, or exported.
    `extra`: more keyword arguments for the backend (trt: device)."""
    from fastblt.runtime.generator import DEFAULT_MAX_CONTEXT, _Engine

    if artifacts is None:
        if backend != "ort":
            raise InputError(f"backend {backend}: needs artifacts=DIR with built engines (see `fastblt build`)")
        artifacts = export_for(g, max_context or DEFAULT_MAX_CONTEXT, cache_dir)
    directory = Path(artifacts).expanduser()
    manifest = read_manifest(directory)
    options = manifest["options"]
    capacity, patch_capacity, dtype = options["capacity"], options["patch_capacity"], options["dtype"]
    if max_context is not None and max_context != capacity:
        raise InputError(
            f"max_context {max_context}: the artifacts in {directory} were exported with capacity {capacity}; "
            "pass max_context=None (the manifest decides) or export again"
        )
    specs = step_specs(g.config, capacity, patch_capacity, dtype)
    recorded = manifest["checkpoint"].get("hash")
    check_config(manifest, g.config.to_dict(), directory)
    engine_backend = factory(specs, directory, threads=threads, **(extra or {})).activate()
    engine = _Engine(engine_backend, g.config, capacity, patch_capacity)
    if recorded != source_hash(g):
        if g.checkpoint_path is not None:
            raise ManifestMismatch(
                f"{directory / MANIFEST}: field checkpoint.hash: artifacts exported from {str(recorded)[:16]}, "
                f"this checkpoint ({g.checkpoint_path}) is {source_hash(g)[:16]}; export it again"
            )
        probe(g.model, engine, dtype, directory)
    return engine


def check_config(manifest: dict, config: dict, directory: Path) -> None:
    """The manifest's model config must be the checkpoint's, field by field."""
    got = manifest["checkpoint"].get("config")
    if got == json.loads(json.dumps(config)):
        return
    diff = _first_diff(got, json.loads(json.dumps(config)), "checkpoint.config")
    raise ManifestMismatch(f"{directory / MANIFEST}: field {diff}; the artifacts come from another model")


def _first_diff(a, b, where: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_diff(a.get(k), b.get(k), f"{where}.{k}")
    return f"{where}: artifacts have {a!r}, the checkpoint has {b!r}"


def probe(model: BltModel, engine: _Engine, dtype: str, directory: Path) -> None:
    """A short prompt through the graphs and through the torch steps: same logits, or refuse."""
    from fastblt.engines.torch_backend import TorchBackend
    from fastblt.runtime.state import SequenceState

    n = min(len(PROBE_IDS), engine.capacity, engine.patch_capacity)
    ids = PROBE_IDS[:n]
    ref_specs = step_specs(model.config, engine.capacity, engine.patch_capacity)
    ref = SequenceState(TorchBackend(ref_specs, model), model.config, engine.capacity, engine.patch_capacity)
    cand = SequenceState(engine.backend, model.config, engine.capacity, engine.patch_capacity, lock=engine.lock)
    want, got = ref.append(ids), cand.append(ids)
    if dtype in PROBE_ATOL:
        ok = float((want - got).abs().max()) <= PROBE_ATOL[dtype]
    else:
        ok = float((want.argmax(-1) == got.argmax(-1)).float().mean()) >= 0.9
    if not ok:
        raise ManifestMismatch(
            f"{directory}: the graphs do not compute this model (probe logits differ: max abs "
            f"{float((want - got).abs().max()):.3g}); the artifacts come from other weights"
        )


def export_for(g: Generator, capacity: int, cache_dir: str | Path | None) -> Path:
    """Export this Generator's model once into the cache (up-to-date exports are reused)."""
    from fastblt.export.exporter import ExportOptions, existing_export, export_model

    root = Path(cache_dir or os.environ.get("FASTBLT_CACHE", DEFAULT_CACHE)).expanduser()
    key = source_hash(g)
    options = ExportOptions(dtype="float32", capacity=capacity)
    out = root / key[:16] / f"{options.dtype}-{capacity}"
    if existing_export(out, key, options) == "same":
        return out
    model = g.model if next(g.model.parameters()).dtype == torch.float32 else _fp32_copy(g.model)
    source = str(g.checkpoint_path) if g.checkpoint_path is not None else "in-memory model"
    try:
        export_model(model, out, options, checkpoint_hash=key, checkpoint_source=source, force=True)
    except ManifestMismatch:
        if existing_export(out, key, options) != "same":  # another process won the race: fine
            raise
    return out


def _fp32_copy(model: BltModel) -> BltModel:
    import copy

    return copy.deepcopy(model).float()
