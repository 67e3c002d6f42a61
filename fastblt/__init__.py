"""fastblt: Byte Latent Transformer checkpoints to ONNX / TensorRT, driven by an exact runtime.

Public API (imports are lazy so `import fastblt` stays light):
    fastblt.load("default" | path) -> BltModel
    fastblt.encode(text_or_bytes) -> list[int]      fastblt.decode(ids) -> str
    fastblt.Generator(checkpoint_or_model, backend="ort"|"torch"|"trt", artifacts=None)
    fastblt.AsyncEngine(checkpoint_or_model, backend="ort", max_batch=16)   (asyncio, batched)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastblt.errors import FastBltError
from fastblt.model.tokenizer import decode, encode
from fastblt.version import __version__ as __version__

if TYPE_CHECKING:
    from fastblt.model.blt import BltModel

__all__ = ["FastBltError", "decode", "encode", "load", "Generator", "Generation", "AsyncEngine", "BatchEngine"]

_LAZY = {
    "Generator": "fastblt.runtime.generator",
    "Generation": "fastblt.runtime.generator",
    "AsyncEngine": "fastblt.runtime.async_engine",
    "BatchEngine": "fastblt.runtime.batch",
}


def load(path_or_name: str = "default", dtype: Any = None) -> BltModel:
    """Load a checkpoint in any supported format ("default" = the embedded one) as a BltModel."""
    from fastblt.formats.checkpoint import load_checkpoint

    return load_checkpoint(path_or_name, dtype=dtype)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastblt' has no attribute {name!r}")
