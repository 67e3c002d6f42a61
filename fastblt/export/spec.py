"""The step contract, declared once: every input and output of the five step graphs with its name,
dtype and shape (named dimensions are dynamic). The torch reference, the ONNX export, the manifest,
TensorRT profiles and the runtime's checks all read this.

Dynamic dimensions: `batch`, `new` (S new positions), `patches` (Pn new patches), `patch_len` (L,
the longest new patch). Static: cache capacities `capacity` (bytes) and `patch_capacity`.
Cache I/O: `past.{layer}.k` in, `present.{layer}.k` out (only the S new entries).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from fastblt.errors import InputError
from fastblt.model.config import BltConfig, StackConfig

STEPS = ("entropy", "encoder", "global", "decoder", "decoder_block")
DYNAMIC_DIMS = ("batch", "new", "patches", "patch_len")
STACKS = ("entropy", "encoder", "global", "decoder")  # the four self-attention caches
PAST, PRESENT, CROSS = "past", "present", "cross"  # cache inputs, new cache entries, decoder cross k/v
TORCH_DTYPES = {"int32": torch.int32, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FLOAT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # short name -> the spec's dtype


def float_dtype(name: str, what: str = "dtype") -> str:
    """A float dtype by its short (fp16) or full (float16) name -> the full name; InputError if neither."""
    full = FLOAT_DTYPES.get(name, name)
    if full not in FLOAT_DTYPES.values():
        raise InputError(f"{what} {name!r}: unsupported; choose one of {', '.join(FLOAT_DTYPES)}")
    return full


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "int32" | "float32" | "float16" | "bfloat16"
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class StepSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    stack: str  # which cache this step reads/writes: "entropy" | "encoder" | "global" | "decoder"

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def to_dict(self) -> dict:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "stack": self.stack,
        }


def kv_names(prefix: str, n_layers: int) -> list[tuple[str, str]]:
    """The (k, v) tensor names of a cache: `past.{i}.k` / `past.{i}.v` per layer i."""
    return [(f"{prefix}.{i}.k", f"{prefix}.{i}.v") for i in range(n_layers)]


T = TypeVar("T")


def named_kv(prefix: str, kv: Sequence[tuple[T, T]]) -> dict[str, T]:
    """Per-layer (k, v) pairs -> {name: tensor} under `prefix`."""
    out: dict[str, T] = {}
    for (k_name, v_name), (k, v) in zip(kv_names(prefix, len(kv)), kv, strict=True):
        out[k_name], out[v_name] = k, v
    return out


def kv_from(tensors: Mapping[str, T], prefix: str, n_layers: int) -> list[tuple[T, T]]:
    """{name: tensor} -> the per-layer (k, v) pairs named under `prefix`."""
    return [(tensors[k], tensors[v]) for k, v in kv_names(prefix, n_layers)]


def _cache(prefix: str, cfg: StackConfig, length: int | str, dtype: str) -> list[TensorSpec]:
    shape = ("batch", cfg.n_heads, length, cfg.head_dim)
    return [TensorSpec(name, dtype, shape) for pair in kv_names(prefix, cfg.n_layers) for name in pair]


def _cross(config: BltConfig, length: int | str, dtype: str) -> list[TensorSpec]:
    shape = ("batch", length, config.cross_attn_k, config.decoder.dim)
    return [TensorSpec(name, dtype, shape) for pair in kv_names(CROSS, config.decoder_cross_layers) for name in pair]


def step_specs(config: BltConfig, capacity: int, patch_capacity: int, dtype: str = "float32") -> dict[str, StepSpec]:
    """All step specs for a config; `dtype` is the float dtype of states and caches.

    Entropies and logits are always float32 (docs/architecture.md: entropy and the head run in fp32).
    """
    i32, f32 = "int32", "float32"
    start = TensorSpec("start", i32, ("batch",))
    V = config.vocab_size
    specs: dict[str, StepSpec] = {}
    if config.entropy is not None:
        e = config.entropy
        specs["entropy"] = StepSpec(
            "entropy",
            (TensorSpec("tokens", i32, ("batch", "new")), start, *_cache("past", e, capacity, dtype)),
            (TensorSpec("entropies", f32, ("batch", "new")), *_cache("present", e, "new", dtype)),
            "entropy",
        )
    enc = config.encoder
    specs["encoder"] = StepSpec(
        "encoder",
        (
            TensorSpec("tokens", i32, ("batch", "new")),
            TensorSpec("hash_ids", i32, ("batch", "new", config.n_hash_tables)),
            start,
            *_cache("past", enc, capacity, dtype),
        ),
        (TensorSpec("h", dtype, ("batch", "new", enc.dim)), *_cache("present", enc, "new", dtype)),
        "encoder",
    )
    g = config.global_model
    specs["global"] = StepSpec(
        "global",
        (
            TensorSpec("patch_bytes", dtype, ("batch", "patches", "patch_len", enc.dim)),
            TensorSpec("patch_lens", i32, ("batch", "patches")),
            start,
            *_cache("past", g, patch_capacity, dtype),
        ),
        (
            TensorSpec("latents", dtype, ("batch", "patches", g.dim)),
            *_cross(config, "patches", dtype),
            *_cache("present", g, "patches", dtype),
        ),
        "global",
    )
    dec = config.decoder
    specs["decoder"] = StepSpec(
        "decoder",
        (
            TensorSpec("h", dtype, ("batch", "new", dec.dim)),
            TensorSpec("read_patch", i32, ("batch", "new")),
            start,
            *_cache("past", dec, capacity, dtype),
            *_cross(config, patch_capacity, dtype),
        ),
        (TensorSpec("logits", f32, ("batch", "new", V)), *_cache("present", dec, "new", dtype)),
        "decoder",
    )
    if config.blt_d is not None:
        specs["decoder_block"] = StepSpec(
            "decoder_block",
            (
                TensorSpec("block_ids", i32, ("batch", "new")),
                start,
                TensorSpec("read_patch", i32, ("batch",)),
                *_cache("past", dec, capacity, dtype),
                *_cross(config, patch_capacity, dtype),
            ),
            (TensorSpec("logits", f32, ("batch", "new", V)),),
            "decoder",
        )
    return specs


NEW_POSITION_INPUTS = ("tokens", "h", "block_ids", "patch_lens")  # dim 1 of each: the call's S (Pn)


def new_positions(feeds: dict) -> int:
    """How many positions (patches, for the global step) a call computes; -1 if no input says."""
    for name in NEW_POSITION_INPUTS:
        if name in feeds:
            return int(feeds[name].shape[1])
    return -1


def slots(spec: StepSpec, prefix: str = PAST) -> int:
    """The static slot count of a step's cache input: `past` (its stack's cache: bytes, or patches
    for global) or `cross` (the decoder's per-patch cross-attention keys: patches)."""
    t = spec.input(f"{prefix}.0.k")
    n = t.shape[2] if prefix == PAST else t.shape[1]
    if not isinstance(n, int):
        raise InputError(f"graph {spec.name} | input {t.name}: its slot axis must be static, got {n!r}")
    return n


def cache_capacity(specs: Mapping[str, StepSpec], stack: str) -> int:
    """The static slot count of a stack's cache as the specs declare it (bytes, or patches for global)."""
    return slots(specs[stack])


def capacities(specs: Mapping[str, StepSpec]) -> tuple[int, int]:
    """(byte capacity, patch capacity) of a set of step specs."""
    return cache_capacity(specs, "encoder"), cache_capacity(specs, "global")


def state_dtype(specs: Mapping[str, StepSpec]) -> str:
    """The float dtype of states and caches ("float32", "float16", "bfloat16")."""
    return specs["encoder"].input(f"{PAST}.0.k").dtype
