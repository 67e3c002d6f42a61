"""Exported artifacts for the graph backends (ort, trt): find or make them, and prove they match.

- `artifacts=DIR`: the manifest decides the dtype and the capacities. The artifacts must come from
  this checkpoint: the manifest's config must equal the checkpoint's, and its checkpoint hash must
  equal the checkpoint directory's (`checkpoint_hash`) or the in-memory model's (`model_hash`).
  A model given in memory whose hash the manifest does not record is probed instead: a short
  prompt through the graphs and through the torch steps must give the same logits.
- `artifacts=None` (ort only): exported on first use (fp32, for the CPU) into the export cache
  (export/cache.py), and found there by every later call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastblt.engines.base import Backend
from fastblt.engines.registry import backend_factory
from fastblt.engines.torch_backend import TorchBackend
from fastblt.errors import InputError, ManifestMismatch
from fastblt.export.cache import ExportNotice, cached_export, model_hash, source_hash
from fastblt.export.manifest import MANIFEST, read_manifest, verify_source
from fastblt.export.options import ExportOptions
from fastblt.export.spec import StepSpec, max_step, step_specs
from fastblt.model.blt import BltModel
from fastblt.runtime.state import SequenceState

PROBE_IDS = [1, *range(40, 72)]  # BOS + 32 bytes (one step of any max_step >= 33): several patches
PROBE_ATOL = {"float32": 1e-3}  # reduced precision: compared by argmax agreement instead


def graph_backend(
    model: BltModel,
    checkpoint_path: Path | None,
    name: str,
    artifacts: str | Path | None,
    threads: int | None,
    cache_dir: str | Path | None,
    extra: dict | None = None,
    notice: ExportNotice | None = None,
) -> Backend:
    """An activated graph backend `name` (ort, trt) over artifacts proven to compute `model`.

    artifacts None: the export cache's entry (exported now if missing, `notice` told). `extra`:
    more keyword arguments for the backend (trt: device).
    """
    factory = backend_factory(name)  # unknown / unavailable backends fail here, with the reason
    if artifacts is None:
        if name != "ort":
            raise InputError(f"backend {name}: needs artifacts=DIR with built engines (see `fastblt build`)")
        key = source_hash(model, checkpoint_path)
        source = str(checkpoint_path) if checkpoint_path is not None else "in-memory model"
        artifacts = cached_export(
            model, key, ExportOptions(dtype="float32"), source, cache_dir=cache_dir, notice=notice
        )
    directory = Path(artifacts).expanduser()
    manifest = read_manifest(directory)
    options = manifest["options"]
    known = source_hash(model, checkpoint_path) if checkpoint_path else None
    verify_source(manifest, model.config.to_dict(), directory / MANIFEST, known)
    specs = _manifest_specs(model, options, directory)
    backend = factory(specs, directory, threads=threads, **(extra or {})).activate()
    if checkpoint_path is None and manifest["checkpoint"].get("hash") != model_hash(model):
        probe(model, backend, options["dtype"], directory)
    return backend


def _manifest_specs(model: BltModel, options: dict, directory: Path) -> dict[str, StepSpec]:
    """The step specs the manifest's options give for `model`: options that no export could have
    (a diffusion block longer than max_step) mean the manifest was edited, so it is named."""
    try:
        return step_specs(model.config, options["max_step"], options["dtype"])
    except InputError as e:
        raise ManifestMismatch(f"{directory / MANIFEST}: field options: {e}") from None


def probe(model: BltModel, backend: Backend, dtype: str, directory: Path) -> None:
    """A short prompt through the graphs and through the torch steps: same logits, or refuse."""
    ref = SequenceState(TorchBackend(step_specs(model.config, max_step(backend.specs)), model), model.config)
    cand = SequenceState(backend, model.config)
    want, got = ref.run(ref.append(PROBE_IDS)), cand.run(cand.append(PROBE_IDS))  # (S, V) numpy
    diff = float(np.abs(want - got).max())
    agree = float((want.argmax(-1) == got.argmax(-1)).mean())
    ok = diff <= PROBE_ATOL[dtype] if dtype in PROBE_ATOL else agree >= 0.9
    if not ok:
        raise ManifestMismatch(
            f"{directory}: the graphs do not compute this model (probe logits differ: max abs "
            f"{diff:.3g}); the artifacts come from other weights"
        )
