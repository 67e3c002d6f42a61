"""What an export is keyed by, and whether a directory already holds it: read on every run that
finds its graphs in the export cache, so nothing here imports onnx (the exporter, which builds and
checks graphs, does; it is imported only when something is exported).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastblt.errors import InputError, ManifestMismatch
from fastblt.export.manifest import MANIFEST, code_versions, read_manifest, verify_files
from fastblt.export.spec import DEFAULT_MAX_STEP, OPSET, StepSpec, float_dtype, step_specs
from fastblt.model.config import BltConfig

# The graphs use Attention, RMSNormalization, RotaryEmbedding (opset 23) and TensorScatter (24);
# onnxruntime 1.32's CPU EP runs them, TensorRT parses them from 10.15 on (export/trt_ops.txt).
OPSETS = (OPSET,)
DEFAULT_OPSET = OPSET
EXTERNAL_DATA_BYTES = 64 << 20  # graphs with more initializer bytes keep them in <file>.data


@dataclass(frozen=True)
class ExportOptions:
    """What an export is keyed by (with the checkpoint hash): same options -> same graphs."""

    dtype: str = "float32"  # "float32" | "float16" | "bfloat16" (or fp32/fp16/bf16)
    opset: int = DEFAULT_OPSET
    max_step: int = DEFAULT_MAX_STEP  # positions per step call (sets the rings' sizes, export/spec.py)
    max_batch: int = 64  # upper bound of the dynamic batch dim (TensorRT profiles; a batch engine's rows)
    external_data_bytes: int = field(default=EXTERNAL_DATA_BYTES, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", float_dtype(self.dtype))
        if self.opset not in OPSETS:
            raise InputError(
                f"opset {self.opset}: unsupported; the graphs need opset {OPSET} (TensorScatter, Attention)"
            )
        if not isinstance(self.max_step, int) or self.max_step < 2:
            raise InputError(f"max_step {self.max_step!r}: expected an int >= 2")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise InputError(f"max_batch {self.max_batch!r}: expected an int >= 1")

    def key(self) -> dict:
        """The options as recorded in (and compared against) the manifest."""
        d = asdict(self)
        d.pop("external_data_bytes")
        return d

    def specs(self, config: BltConfig) -> dict[str, StepSpec]:
        return step_specs(config, self.max_step, self.dtype)


# progress events: ("start" | "exported", step, index, total, None), then ("done", step, index, total, entry)
Progress = Callable[[str, str, int, int, dict | None], None]


def existing_export(out: Path, checkpoint_hash: str | None, options: ExportOptions) -> str | None:
    """What `out` holds: None (nothing / empty dir), "same" (this checkpoint and these options,
    files intact) or a one-line description of why it is not: "is ..." when it holds no export
    at all, else why it is a different export (`refusal` phrases either for the user)."""
    out = Path(out)
    if not out.exists():
        return None
    if not out.is_dir():
        return "is a file, not an export directory"
    if not (out / MANIFEST).exists():
        entries = sorted(p.name for p in out.iterdir())
        return f"is a directory that holds other files ({', '.join(entries[:5])}), not an export" if entries else None
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
    written, now = manifest.get("versions", {}), code_versions()
    if (written.get("fastblt"), written.get("graphs")) != (now["fastblt"], now["graphs"]):
        return f"it was written by fastblt {written.get('fastblt')} (graph code {written.get('graphs')})"
    return "same"


def refusal(out: Path, status: str) -> str:
    """Why `out` (of `existing_export` status `status`) is not replaced without --force, in one line."""
    what = status if status.startswith("is ") else f"already holds a different export ({status})"
    return f"{out}: {what}; pass --force to replace it"
