"""The step contract, declared once: every input and output of the five step graphs with its name,
dtype and shape (named dimensions are dynamic). The torch reference, the ONNX export, the manifest,
TensorRT profiles and the runtime's checks all read this.

Dynamic dimensions: `batch`, `new` (S new positions), `patches` (Pn new patches), `patch_len` (L,
the longest new patch) and `past` (the slots of a linear cache: the live prefix, rounded up).
Caches (model/steps.py): a windowed stack keeps a ring of `window + max_step` slots (static); an
unwindowed one (the global transformer) a linear cache of `past` slots, each (batch, heads, slots,
head_dim); the decoder reads patches through a cross ring (batch, 1, max_step + 2 slots, k * d),
patch p in slot p mod the ring's size. Both are 4-D with the slot axis at -2, as TensorRT's
TensorScatter and Attention want them. Cache I/O: `past.{layer}.k` in, `present.{layer}.k`
out, and the output *is* the input's buffer, updated in place (`StepSpec.aliases`); likewise the
global step's `cross_present.{layer}.k` is its `cross.{layer}.k`. `max_step` bounds every call's
S and Pn, and how far the runtime may roll back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from fastblt.errors import InputError
from fastblt.model.config import BltConfig, StackConfig
from fastblt.model.steps import ring_slots

STEPS = ("entropy", "encoder", "global", "decoder", "decoder_block")
DYNAMIC_DIMS = ("batch", "new", "patches", "patch_len", "past")
STACKS = ("entropy", "encoder", "global", "decoder")  # the four self-attention caches
PAST, PRESENT, CROSS, CROSS_PRESENT = "past", "present", "cross", "cross_present"
OPSET = 24  # the ONNX opset the graphs are written in (TensorScatter, Attention, RotaryEmbedding, RMSNormalization)
DEFAULT_MAX_STEP = 32  # positions per step call: prefill chunks, k + 1 verified bytes, a block
# blt-s drafts per round, so verify steps of DEFAULT_K + 1 positions: 7-12% faster than 8 on code
# and prose, greedy or sampled (docs/generation.md)
DEFAULT_K = 16
PAST_BUCKET = 64  # a linear cache's `past` is its live prefix rounded up to a multiple of this (at least)
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
    stack: str  # which self-attention cache this step reads/writes: "entropy" | "encoder" | "global" | "decoder"
    slots: int | str  # that cache's slots: a ring's size, or "past" (linear, dynamic)
    max_step: int  # the most new positions (patches) one call may carry
    aliases: tuple[tuple[str, str], ...] = ()  # (output, input): the output is the input's buffer, updated

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    @property
    def ring(self) -> bool:
        return isinstance(self.slots, int)

    def to_dict(self) -> dict:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "stack": self.stack,
            "slots": self.slots,
            "max_step": self.max_step,
            "aliases": {out: inp for out, inp in self.aliases},
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


def _cache(prefix: str, cfg: StackConfig, slots: int | str, dtype: str) -> list[TensorSpec]:
    shape = ("batch", cfg.n_heads, slots, cfg.head_dim)
    return [TensorSpec(name, dtype, shape) for pair in kv_names(prefix, cfg.n_layers) for name in pair]


def _cross(config: BltConfig, slots: int, dtype: str, prefix: str = CROSS) -> list[TensorSpec]:
    shape = ("batch", 1, slots, config.cross_attn_k * config.decoder.dim)
    return [TensorSpec(name, dtype, shape) for pair in kv_names(prefix, config.decoder_cross_layers) for name in pair]


@dataclass(frozen=True)
class DimRange:
    """The range a named dynamic dimension may take at run time (recorded in the manifest)."""

    min: int
    max: int

    def to_dict(self) -> dict:
        return {"min": self.min, "max": self.max}


def dim_ranges(config: BltConfig, max_step: int, max_batch: int) -> dict[str, DimRange]:
    """Named dynamic dims -> DimRange: a call carries at most max_step positions or patches, a patch
    is at most max_patch_length bytes (else a local stack's position limit), and a linear cache's
    `past` reaches the global model's position limit, rounded up to a bucket."""
    longest = config.patching.max_patch_length or config.encoder.max_positions
    past = -(-config.global_model.max_positions // PAST_BUCKET) * PAST_BUCKET
    return {
        "batch": DimRange(1, max_batch),
        "new": DimRange(1, max_step),
        "patches": DimRange(1, max_step),
        "patch_len": DimRange(1, longest),
        "past": DimRange(1, past),
    }


def past_slots(n: int) -> int:
    """The `past` of a linear cache holding n positions: n rounded up to PAST_BUCKET, or to an eighth
    of the largest power of two <= n once that is more. A cache grows by copying itself whole into
    a larger buffer, so growing by at least an eighth halves what a long prompt copies (a 10 KB
    prompt: 27 copies of ~1,100 slots on average instead of 41 of ~1,340), for at most 1/8 more
    slots attended (masked)."""
    step = max(PAST_BUCKET, 1 << max(n.bit_length() - 4, 0))
    return -(-max(n, 1) // step) * step


def cache_slots(cfg: StackConfig, max_step: int) -> int | str:
    """A stack's cache slots: its ring's size if it has a window, else the dynamic "past"."""
    ring = ring_slots(cfg.window, max_step)
    return "past" if ring is None else ring


def cross_slots(max_step: int) -> int:
    """The decoder's cross ring: every patch one step's positions can read (the one closed before
    the step and up to max_step closed in it), and one a rollback may leave behind."""
    return max_step + 2


def _in_place(n_layers: int, prefix_in: str, prefix_out: str) -> tuple[tuple[str, str], ...]:
    """(output, input) name pairs of caches updated in place: present.{i}.k is past.{i}.k."""
    pairs = zip(kv_names(prefix_in, n_layers), kv_names(prefix_out, n_layers), strict=True)
    return tuple((o, i) for ins, outs in pairs for i, o in zip(ins, outs, strict=True))


def step_specs(config: BltConfig, max_step: int = DEFAULT_MAX_STEP, dtype: str = "float32") -> dict[str, StepSpec]:
    """All step specs for a config; `dtype` is the float dtype of states and caches.

    Entropies and logits are always float32 (docs/architecture.md: entropy and the head run in fp32).
    """
    if not isinstance(max_step, int) or max_step < 2:
        raise InputError(f"max_step {max_step!r}: expected an int >= 2")
    if config.blt_d is not None and config.blt_d.block_size > max_step:
        raise InputError(f"max_step {max_step}: a diffusion block of {config.blt_d.block_size} must fit one step")
    i32, f32 = "int32", "float32"
    start = TensorSpec("start", i32, ("batch",))
    V = config.vocab_size
    C = cross_slots(max_step)
    specs: dict[str, StepSpec] = {}

    stacks = {"entropy": config.entropy, "encoder": config.encoder, "global": config.global_model}
    stacks["decoder"] = config.decoder

    def spec(name: str, inputs: list, outputs: list, stack: str, aliases: tuple = ()) -> StepSpec:
        slots = cache_slots(stacks[stack], max_step)
        return StepSpec(name, tuple(inputs), tuple(outputs), stack, slots, max_step, aliases)

    if config.entropy is not None:
        e = config.entropy
        R = cache_slots(e, max_step)
        specs["entropy"] = spec(
            "entropy",
            [TensorSpec("tokens", i32, ("batch", "new")), start, *_cache(PAST, e, R, dtype)],
            [TensorSpec("entropies", f32, ("batch", "new")), *_cache(PRESENT, e, R, dtype)],
            "entropy",
            _in_place(e.n_layers, PAST, PRESENT),
        )
    enc = config.encoder
    R = cache_slots(enc, max_step)
    specs["encoder"] = spec(
        "encoder",
        [
            TensorSpec("tokens", i32, ("batch", "new")),
            TensorSpec("hash_ids", i32, ("batch", "new", config.n_hash_tables)),
            start,
            *_cache(PAST, enc, R, dtype),
        ],
        [TensorSpec("h", dtype, ("batch", "new", enc.dim)), *_cache(PRESENT, enc, R, dtype)],
        "encoder",
        _in_place(enc.n_layers, PAST, PRESENT),
    )
    g, dec = config.global_model, config.decoder
    R = cache_slots(g, max_step)
    specs["global"] = spec(
        "global",
        [
            TensorSpec("patch_bytes", dtype, ("batch", "patches", "patch_len", enc.dim)),
            TensorSpec("patch_lens", i32, ("batch", "patches")),
            start,
            *_cache(PAST, g, R, dtype),
            *_cross(config, C, dtype),
        ],
        [
            TensorSpec("latents", dtype, ("batch", "patches", g.dim)),
            *_cache(PRESENT, g, R, dtype),
            *_cross(config, C, dtype, CROSS_PRESENT),
        ],
        "global",
        _in_place(g.n_layers, PAST, PRESENT) + _in_place(config.decoder_cross_layers, CROSS, CROSS_PRESENT),
    )
    R = cache_slots(dec, max_step)
    specs["decoder"] = spec(
        "decoder",
        [
            TensorSpec("h", dtype, ("batch", "new", dec.dim)),
            TensorSpec("read_patch", i32, ("batch", "new")),
            start,
            *_cache(PAST, dec, R, dtype),
            *_cross(config, C, dtype),
        ],
        [TensorSpec("logits", f32, ("batch", "new", V)), *_cache(PRESENT, dec, R, dtype)],
        "decoder",
        _in_place(dec.n_layers, PAST, PRESENT),
    )
    if config.blt_d is not None:
        specs["decoder_block"] = spec(
            "decoder_block",
            [
                TensorSpec("block_ids", i32, ("batch", "new")),
                start,
                TensorSpec("read_patch", i32, ("batch",)),
                *_cache(PAST, dec, R, dtype),
                *_cross(config, C, dtype),
            ],
            [TensorSpec("logits", f32, ("batch", "new", V))],
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


def state_dtype(specs: Mapping[str, StepSpec]) -> str:
    """The float dtype of states and caches ("float32", "float16", "bfloat16")."""
    return specs["encoder"].input(f"{PAST}.0.k").dtype


def max_step(specs: Mapping[str, StepSpec]) -> int:
    """The most new positions one call of these graphs may carry."""
    return specs["encoder"].max_step
