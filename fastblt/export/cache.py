"""The export cache: a checkpoint's step graphs exported once per (weights, dtype, max_step) and
found again by every later user (the runtime's first use, `fastblt validate` without --artifacts).

Layout: `<root>/<source hash[:16]>/<dtype>-step<max_step>/` holding an ordinary export directory
(manifest.json + .onnx files). The root is, first found: the `cache_dir` argument, the
FASTBLT_CACHE environment variable, `~/.cache/fastblt`. The source hash is the checkpoint
directory's `checkpoint_hash`, or for a model held only in memory `model_hash` over its config and
tensors. An entry is reused only while its manifest says it is the same export (`existing_export`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from fastblt.errors import ManifestMismatch
from fastblt.export.options import ExportOptions, Progress, existing_export
from fastblt.export.spec import TORCH_DTYPES
from fastblt.model.blt import BltModel

DEFAULT_CACHE = Path("~/.cache/fastblt")
CACHE_ENV = "FASTBLT_CACHE"

# Told once, with the directory, right before an export starts; may return a per-graph Progress.
ExportNotice = Callable[[Path], Progress | None]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where cached exports live: `cache_dir`, else $FASTBLT_CACHE, else ~/.cache/fastblt."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def model_hash(model: BltModel) -> str:
    """sha256 over the config and every tensor of the state dict (name, dtype, shape, bytes)."""
    h = hashlib.sha256(b"fastblt-model\0")
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def source_hash(model: BltModel, checkpoint_path: Path | None) -> str:
    """The hash exports are keyed by: the checkpoint directory's, or the in-memory model's."""
    if checkpoint_path is not None:
        from fastblt.formats.checkpoint import checkpoint_hash

        return checkpoint_hash(checkpoint_path)
    return model_hash(model)


def cache_entry(key: str, options: ExportOptions, cache_dir: str | Path | None = None) -> Path:
    """The directory the export of `key` with `options` has in the cache."""
    return cache_root(cache_dir) / key[:16] / f"{options.dtype}-step{options.max_step}"


def cached_export(
    model: BltModel,
    key: str,
    options: ExportOptions,
    source: str,
    cache_dir: str | Path | None = None,
    notice: ExportNotice | None = None,
) -> Path:
    """The cache entry of `model` (whose source hash is `key`), exported first if it is missing or stale.

    `source` is recorded in the manifest (a checkpoint path, or "in-memory model"). The model's
    weights are cast to `options.dtype` on a copy when they differ; the caller's model is not touched.
    Two processes exporting the same entry at once is fine: the loser finds the winner's export.
    """
    out = cache_entry(key, options, cache_dir)
    if existing_export(out, key, options) == "same":
        return out

    from fastblt.export.exporter import export_model  # builds and checks graphs: imports onnx (~0.5 s)

    progress = notice(out) if notice is not None else None
    want = TORCH_DTYPES[options.dtype]
    if any(p.dtype != want for p in model.parameters() if p.is_floating_point()):
        model = copy.deepcopy(model).to(want).eval()
    try:
        export_model(model, out, options, checkpoint_hash=key, checkpoint_source=source, force=True, progress=progress)
    except ManifestMismatch:
        if existing_export(out, key, options) != "same":
            raise
    return out
