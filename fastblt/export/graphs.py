"""One ONNX graph per step, written node by node from the model's weights.

Each builder mirrors its step function in model/steps.py: the same math, in the same layouts,
with the step contract's names (export/spec.py). Written by hand rather than traced so that a
step is the few fused operators it needs (opset 24): RMSNormalization, RotaryEmbedding (the
interleaved pairs of the released models), Attention over (batch, slots, heads * head_dim)
caches, and TensorScatter writing a step's keys/values into its cache in place (circular for
rings, linear for the global cache). Every node records the module it computes in the
`pkg.torch.onnx.name_scopes` metadata the per-layer localisation reads (validate/layers.py).

Precision: fp32 graphs compute as the reference does. fp16/bf16 graphs keep states, caches and
weights in that dtype and compute norms, rotary embeddings, attention and softmax in fp32 (casts
around them), and the head and entropies in fp32.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from fastblt.errors import InternalError
from fastblt.export.spec import (
    CROSS,
    CROSS_PRESENT,
    OPSET,
    PAST,
    PRESENT,
    TORCH_DTYPES,
    StepSpec,
    TensorSpec,
    kv_names,
)
from fastblt.model.config import BltConfig, StackConfig
from fastblt.model.layers import rope_inv_freq

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
ONNX_TYPES = {
    "int32": TensorProto.INT32,
    "int64": TensorProto.INT64,
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
    "bool": TensorProto.BOOL,
}
Weights = Callable[[str], torch.Tensor]  # a parameter by its Meta name, in the graph's dtype


class Graph:
    """A graph under construction: values are names; `op` adds a node and returns its output(s)."""

    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, dtype
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._consts: dict[tuple, str] = {}
        self._weights: set[str] = set()
        self._scopes: list[str] = [""]
        self._count: Counter[str] = Counter()

    @contextlib.contextmanager
    def scope(self, module: str) -> Iterator[None]:
        """Nodes added inside are recorded as computing `module` (a path like local_decoder.layers.0)."""
        self._scopes.append(module)
        try:
            yield
        finally:
            self._scopes.pop()

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, **attrs) -> str | list[str]:
        self._count[op_type] += 1
        where = self._scopes[-1]
        base = f"{where + '/' if where else ''}{op_type}_{self._count[op_type]}"
        names = outputs if isinstance(outputs, list) else [f"{base}:{i}" for i in range(outputs)]
        node = helper.make_node(op_type, list(inputs), names, name=base, **attrs)
        # as the torch exporter writes them: the root, each enclosing module, then the op itself
        scopes = ["", *[f"model.{s}" for s in self._scopes[1:]], op_type]
        helper.set_metadata_props(node, {SCOPES_KEY: repr(scopes)})
        self.nodes.append(node)
        return names[0] if len(names) == 1 else names

    def typed(self, value: float, dtype: str) -> str:
        """A scalar of a graph dtype (bfloat16 included)."""
        return self.weight(f"scalar_{dtype}_{value!r}", torch.tensor(value, dtype=TORCH_DTYPES[dtype]))

    def const(self, value: np.ndarray) -> str:
        """A small constant (deduplicated by value)."""
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            self.inits.append(numpy_helper.from_array(value, name))
            self._consts[key] = name
        return self._consts[key]

    def i64(self, *values: int) -> str:
        return self.const(np.array(values, dtype=np.int64))

    def i32(self, *values: int) -> str:
        return self.const(np.array(values, dtype=np.int32))

    def int_scalar(self, value: int, dtype: type = np.int32) -> str:
        """A 0-d integer constant (what Range takes)."""
        return self.const(np.array(value, dtype=dtype))

    def scalar(self, value: float) -> str:
        return self.const(np.array(value, dtype=np.float32))

    def weight(self, name: str, tensor: torch.Tensor | Callable[[], torch.Tensor]) -> str:
        """An initializer named after the parameter it holds (or a derived one: its name says),
        added once: `tensor` may be a function, called only the first time."""
        if name in self._weights:
            return name
        self._weights.add(name)
        t = (tensor() if callable(tensor) else tensor).detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            proto = helper.make_tensor(name, TensorProto.BFLOAT16, t.shape, t.view(torch.int16).numpy().tobytes(), True)
        else:
            proto = numpy_helper.from_array(t.numpy(), name)
        self.inits.append(proto)
        return name

    def input(self, t: TensorSpec) -> str:
        self.inputs.append(helper.make_tensor_value_info(t.name, ONNX_TYPES[t.dtype], list(t.shape)))
        return t.name

    def output(self, value: str, t: TensorSpec) -> None:
        """Make `value` the graph output `t` (renaming its producer's output)."""
        for node in self.nodes:
            for i, out in enumerate(node.output):
                if out == value:
                    node.output[i] = t.name
            for i, inp in enumerate(node.input):
                if inp == value:
                    node.input[i] = t.name
        self.outputs.append(helper.make_tensor_value_info(t.name, ONNX_TYPES[t.dtype], list(t.shape)))

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fastblt")
        model.ir_version = 10
        return model


# ------------------------------------------------------------------------------ building blocks
class Ops:
    """The model's layers as graph fragments, for one graph and one dtype."""

    def __init__(self, g: Graph, w: Weights, config: BltConfig):
        self.g, self.w, self.config = g, w, config
        self.reduced = g.dtype != "float32"

    def f32(self, x: str) -> str:
        return self.g.op("Cast", x, to=TensorProto.FLOAT) if self.reduced else x

    def back(self, x: str) -> str:
        return self.g.op("Cast", x, to=ONNX_TYPES[self.g.dtype]) if self.reduced else x

    def linear(self, x: str, *names: str) -> str:
        """x @ W^T for one Linear, or several fused into one MatMul (their outputs concatenated)."""
        key = "+".join(names) + ".T"
        self.g.weight(key, lambda: torch.cat([self.w(n) for n in names], dim=0).t())
        return self.g.op("MatMul", x, key)

    def rms_norm(self, x: str, weight: str, eps: float) -> str:
        """RMSNorm in fp32 (the reference normalises in fp32, then scales)."""
        if self.reduced:
            scale = self.g.weight(weight + ".f32", lambda: self.w(weight).float())
        else:
            scale = self.g.weight(weight, lambda: self.w(weight))
        return self.back(self.g.op("RMSNormalization", self.f32(x), scale, axis=-1, epsilon=eps, stash_type=1))

    def rope_tables(self, positions: str, cfg: StackConfig) -> tuple[str, str]:
        """cos, sin (B, S, head_dim/2) fp32 of integer positions (B, S), as layers.rope_angles."""
        inv_freq = self.g.const(rope_inv_freq(cfg.head_dim, float(cfg.rope_theta)))
        angles = self.g.op(
            "Mul", self.g.op("Unsqueeze", self.g.op("Cast", positions, to=TensorProto.FLOAT), self.g.i64(-1)), inv_freq
        )
        return self.g.op("Cos", angles), self.g.op("Sin", angles)

    def heads(self, x: str, n_heads: int, head_dim: int) -> str:
        """(B, S, H*hd) -> (B, H, S, hd)."""
        return self.g.op("Transpose", self.g.op("Reshape", x, self.g.i64(0, 0, n_heads, head_dim)), perm=[0, 2, 1, 3])

    def merge(self, x: str, dim: int) -> str:
        """(B, H, S, hd) -> (B, S, H*hd)."""
        return self.g.op("Reshape", self.g.op("Transpose", x, perm=[0, 2, 1, 3]), self.g.i64(0, 0, dim))

    def rope(self, x: str, cos: str, sin: str) -> str:
        """Interleaved RoPE on (B, H, S, hd), in fp32 (layers.apply_rope)."""
        return self.back(self.g.op("RotaryEmbedding", self.f32(x), cos, sin, interleaved=1))

    def attention(self, q: str, k: str, v: str, mask: str) -> str:
        """softmax(q k^T / sqrt(hd) masked) v over (B, H, S, hd) / (B, H, T, hd), in fp32."""
        return self.back(self.g.op("Attention", self.f32(q), self.f32(k), self.f32(v), mask))

    def ffn(self, x: str, prefix: str) -> str:
        """SwiGLU: w2(silu(w1 x) * w3 x), w1 and w3 in one MatMul."""
        g = self.g
        gate_up = self.linear(x, f"{prefix}.w1.weight", f"{prefix}.w3.weight")
        gate, up = g.op("Split", gate_up, g.i64(*[self.w(f"{prefix}.w1.weight").shape[0]] * 2), axis=-1, outputs=2)
        silu = g.op("Mul", gate, g.op("Sigmoid", gate))
        return self.linear(g.op("Mul", silu, up), f"{prefix}.w2.weight")

    def block(self, x: str, prefix: str, cfg: StackConfig, cos: str, sin: str, mask: str, cache) -> str:
        """The pre-norm transformer block; `cache(k, v) -> (keys, values)` as in model/steps.py.
        Scopes mirror the torch modules, so each one's output is a value leaving its scope."""
        g, D, H, hd = self.g, cfg.dim, cfg.n_heads, cfg.head_dim
        with g.scope(prefix):
            with g.scope(f"{prefix}.attention_norm"):
                h = self.rms_norm(x, f"{prefix}.attention_norm.weight", cfg.norm_eps)
            a = f"{prefix}.attention"
            with g.scope(a):
                qkv = self.linear(h, f"{a}.wq.weight", f"{a}.wk.weight", f"{a}.wv.weight")
                q, k, v = (self.heads(t, H, hd) for t in g.op("Split", qkv, g.i64(D, D, D), axis=-1, outputs=3))
                q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
                keys, values = cache(k, v)
                out = self.linear(self.merge(self.attention(q, keys, values, mask), D), f"{a}.wo.weight")
            x = g.op("Add", x, out)
            with g.scope(f"{prefix}.ffn_norm"):
                h = self.rms_norm(x, f"{prefix}.ffn_norm.weight", cfg.norm_eps)
            with g.scope(f"{prefix}.feed_forward"):
                f = self.ffn(h, f"{prefix}.feed_forward")
            return g.op("Add", x, f)

    def head(self, x: str, prefix: str, cfg: StackConfig) -> str:
        """logits (B, S, V) fp32 = output(norm(x))."""
        with self.g.scope(f"{prefix}.norm"):
            h = self.rms_norm(x, f"{prefix}.norm.weight", cfg.norm_eps)
        with self.g.scope(f"{prefix}.output"):
            return self.f32(self.linear(h, f"{prefix}.output.weight"))


# ------------------------------------------------------------------------------ positions and masks
def step_positions(g: Graph, start: str, S: str) -> tuple[str, str, str]:
    """start (B,) int32 and S (1,) int64 -> the TensorScatter write index (B,) int64, positions
    (B, S) int32 and the last position (B, 1) int32. Positions stay int32: int64 arithmetic in a
    graph is what hashing would look like (export/checks.py)."""
    S32 = g.op("Cast", S, to=TensorProto.INT32)
    ar = g.op("Range", g.int_scalar(0), g.op("Squeeze", S32, g.i64(0)), g.int_scalar(1))
    start_col = g.op("Unsqueeze", start, g.i64(1))  # (B, 1)
    q_pos = g.op("Add", start_col, ar)  # (B, S)
    end = g.op("Sub", g.op("Add", start_col, S32), g.i32(1))  # (B, 1)
    return g.op("Cast", start, to=TensorProto.INT64), q_pos, end


def slot_positions(g: Graph, end: str, slots: int | str, past: str) -> str:
    """The position each slot holds once positions <= end (B, 1) are written: (B, slots) int32, as
    steps.slot_positions (ring: the latest position <= end in the slot's class; linear: the slot)."""
    if isinstance(slots, int):
        j = g.i32(*range(slots))
        return g.op("Sub", end, g.op("Mod", g.op("Sub", end, j), g.i32(slots), fmod=0))
    T = g.op("Cast", g.op("Gather", g.op("Shape", past), g.i64(2), axis=0), to=TensorProto.INT32)
    ar = g.op("Range", g.int_scalar(0), g.op("Squeeze", T, g.i64(0)), g.int_scalar(1))
    return g.op("Unsqueeze", ar, g.i64(0))  # (1, T)


def attention_mask(g: Graph, q_pos: str, k_pos: str, end: str, window: int | None) -> str:
    """(B, 1, S, T) bool: key visible to query if written (0 <= k_pos <= end), causal, in the window."""
    qp = g.op("Unsqueeze", q_pos, g.i64(2))  # (B, S, 1)
    kp = g.op("Unsqueeze", k_pos, g.i64(1))  # (B|1, 1, T)
    ok = g.op("LessOrEqual", kp, qp)
    ok = g.op("And", ok, g.op("GreaterOrEqual", kp, g.i32(0)))
    ok = g.op("And", ok, g.op("LessOrEqual", kp, g.op("Unsqueeze", end, g.i64(2))))
    if window is not None:
        ok = g.op("And", ok, g.op("Less", g.op("Sub", qp, kp), g.i32(window)))
    return g.op("Unsqueeze", ok, g.i64(1))


class RingWrite:
    """In-graph WriteThrough: TensorScatter the step's keys/values into the cache input, in place
    (the graph output aliases it), and attend over all its slots."""

    def __init__(self, g: Graph, names: tuple[str, str], outs: tuple[str, str], start64: str, ring: bool):
        self.g, self.names, self.outs, self.start64 = g, names, outs, start64
        self.mode = "circular" if ring else "linear"

    def __call__(self, k: str, v: str) -> tuple[str, str]:
        keys = self.g.op(
            "TensorScatter", self.names[0], k, self.start64, axis=-2, mode=self.mode, outputs=[self.outs[0]]
        )
        values = self.g.op(
            "TensorScatter", self.names[1], v, self.start64, axis=-2, mode=self.mode, outputs=[self.outs[1]]
        )
        return keys, values


class ReadAfter:
    """In-graph ReadThrough: attend over the cache followed by the step's own keys/values."""

    def __init__(self, g: Graph, names: tuple[str, str]):
        self.g, self.names = g, names

    def __call__(self, k: str, v: str) -> tuple[str, str]:
        return self.g.op("Concat", self.names[0], k, axis=2), self.g.op("Concat", self.names[1], v, axis=2)


def _inputs(g: Graph, spec: StepSpec) -> dict[str, str]:
    return {t.name: g.input(t) for t in spec.inputs}


def _outputs(g: Graph, spec: StepSpec, values: dict[str, str]) -> None:
    aliased = {out for out, _ in spec.aliases}
    for t in spec.outputs:
        if t.name in aliased:  # written by a TensorScatter whose output carries this name already
            g.outputs.append(helper.make_tensor_value_info(t.name, ONNX_TYPES[t.dtype], list(t.shape)))
        else:
            g.output(values[t.name], t)


def _stack_layers(
    o: Ops, x: str, prefix: str, cfg: StackConfig, n_layers: int, positions: str, mask: str, caches
) -> str:
    cos, sin = o.rope_tables(positions, cfg)
    for i in range(n_layers):
        x = o.block(x, f"{prefix}.{i}", cfg, cos, sin, mask, caches[i])
    return x


def _cached_stack(o: Ops, spec: StepSpec, feeds: dict[str, str], x: str, S: str, prefix: str, cfg: StackConfig) -> str:
    """A stack of blocks over S new positions that writes its cache (entropy, encoder, global)."""
    g = o.g
    start64, q_pos, end = step_positions(g, feeds["start"], S)
    k_pos = slot_positions(g, end, spec.slots, feeds[f"{PAST}.0.k"])
    mask = attention_mask(g, q_pos, k_pos, end, cfg.window)
    caches = [
        RingWrite(g, names, outs, start64, spec.ring)
        for names, outs in zip(kv_names(PAST, cfg.n_layers), kv_names(PRESENT, cfg.n_layers), strict=True)
    ]
    return _stack_layers(o, x, prefix, cfg, cfg.n_layers, q_pos, mask, caches)


def _new(g: Graph, x: str, axis: int = 1) -> str:
    """The size of axis 1 of x as a (1,) int64: the call's S or Pn."""
    return g.op("Shape", x, start=axis, end=axis + 1)


# ------------------------------------------------------------------------------ the five steps
def build_entropy(config: BltConfig, spec: StepSpec, w: Weights, dtype: str) -> Graph:
    g = Graph("entropy", dtype)
    o, feeds, cfg = Ops(g, w, config), _inputs(g, spec), config.entropy
    with g.scope("entropy_model"):
        emb = g.weight("entropy_model.tok_embeddings.weight", w("entropy_model.tok_embeddings.weight"))
        x = g.op("Gather", emb, feeds["tokens"])
        x = _cached_stack(o, spec, feeds, x, _new(g, feeds["tokens"]), "entropy_model.layers", cfg)
        logits = o.head(x, "entropy_model", cfg)
        logp = g.op("LogSoftmax", logits, axis=-1)
        ent = g.op("Neg", g.op("ReduceSum", g.op("Mul", g.op("Exp", logp), logp), g.i64(-1), keepdims=0))
    _outputs(g, spec, {"entropies": ent})
    return g


def build_encoder(config: BltConfig, spec: StepSpec, w: Weights, dtype: str) -> Graph:
    g = Graph("encoder", dtype)
    o, feeds, cfg = Ops(g, w, config), _inputs(g, spec), config.encoder
    tables = [f"encoder_hash_tok_embedding.{t}.weight" for t in range(config.n_hash_tables)]
    with g.scope("local_encoder"):
        tok = g.weight("local_encoder.tok_embeddings.weight", w("local_encoder.tok_embeddings.weight"))
        x = g.op("Gather", tok, feeds["tokens"])
        # the hash tables as one: table t's rows start at t * hash_vocab
        fused = g.weight("encoder_hash_tok_embedding.fused", torch.cat([w(n) for n in tables], dim=0))
        offsets = g.const(np.arange(config.n_hash_tables, dtype=np.int32) * config.hash_vocab)
        rows = g.op("Gather", fused, g.op("Add", feeds["hash_ids"], offsets))  # (B, S, T, d)
        x = g.op("Add", x, g.op("ReduceSum", rows, g.i64(2), keepdims=0))
        h = _cached_stack(o, spec, feeds, x, _new(g, feeds["tokens"]), "local_encoder.layers", cfg)
    _outputs(g, spec, {"h": h})
    return g


def build_global(config: BltConfig, spec: StepSpec, w: Weights, dtype: str) -> Graph:
    g = Graph("global", dtype)
    o, feeds = Ops(g, w, config), _inputs(g, spec)
    x = _patch_slots(o, feeds["patch_bytes"], feeds["patch_lens"])
    cfg = config.global_model
    with g.scope("global_transformer"):
        if config.has_global_projection:
            x = o.linear(x, "global_transformer.token_embedding_projection.weight")
        latents = _cached_stack(o, spec, feeds, x, _new(g, feeds["patch_lens"]), "global_transformer.layers", cfg)
    _cross_write(o, latents, feeds)
    _outputs(g, spec, {"latents": latents})
    return g


def _patch_slots(o: Ops, patch_bytes: str, patch_lens: str) -> str:
    """steps.patch_slots_padded: (B, Pn, L, d), (B, Pn) -> (B, Pn, k*d)."""
    g, config = o.g, o.config
    D, k = config.encoder.dim, config.cross_attn_k
    shape = g.op("Shape", patch_bytes)  # B, Pn, L, d
    L = g.op("Gather", shape, g.i64(2), axis=0)
    with g.scope("local_encoder"):
        ar = g.op("Range", g.int_scalar(0, np.int64), g.op("Squeeze", L, g.i64(0)), g.int_scalar(1, np.int64))
        valid = g.op("Less", ar, g.op("Unsqueeze", g.op("Cast", patch_lens, to=TensorProto.INT64), g.i64(-1)))
        lowest = g.typed(torch.finfo(TORCH_DTYPES[g.dtype]).min, g.dtype)
        pooled = g.op(
            "ReduceMax", g.op("Where", g.op("Unsqueeze", valid, g.i64(-1)), patch_bytes, lowest), g.i64(2), keepdims=0
        )
        nonempty = g.op("Unsqueeze", g.op("Greater", patch_lens, g.const(np.array(0, dtype=np.int32))), g.i64(-1))
        pooled = g.op("Where", nonempty, pooled, g.typed(0.0, g.dtype))
        with g.scope("local_encoder.patch_embedding_projection"):
            q = o.linear(pooled, "local_encoder.patch_embedding_projection.weight")  # (B, Pn, k*d)
        flat = g.op("Concat", g.i64(-1), g.op("Shape", patch_bytes, start=2), axis=0)  # (B*Pn, L, d)
        q = g.op("Reshape", q, g.i64(-1, k, D))
        kv = g.op("Reshape", patch_bytes, flat)
        mask = g.op("Unsqueeze", g.op("Reshape", valid, g.i64(-1, 1, 0)), g.i64(1))  # (B*Pn, 1, 1, L)
        mask = g.op("Expand", mask, g.i64(1, 1, k, 1))  # onnxruntime wants the query axis spelled out
        with g.scope("local_encoder.cross_attn_layers.0"):
            x = _cross_attend(o, "local_encoder.cross_attn_layers.0", q, kv, mask, config.cross_attn_heads_encoder, D)
        slots = g.op("Add", q, x)  # the doubled residual: q + (q + attn)
        out_shape = g.op("Concat", g.op("Shape", patch_bytes, end=2), g.i64(k * D), axis=0)
        return g.op("Reshape", slots, out_shape)


def _cross_attend(o: Ops, prefix: str, x: str, kv: str, mask: str, n_heads: int, dim: int) -> str:
    """layers.CrossAttention.forward: x + wo(attend(wq(norm_q x), wk(norm_kv kv), wv(norm_kv kv)))."""
    g, eps, hd = o.g, o.config.encoder.norm_eps, dim // n_heads
    kvn = o.rms_norm(kv, f"{prefix}.cross_attn_norm_kv.weight", eps)
    keys = o.heads(o.linear(kvn, f"{prefix}.wk.weight"), n_heads, hd)
    values = o.heads(o.linear(kvn, f"{prefix}.wv.weight"), n_heads, hd)
    q = o.linear(o.rms_norm(x, f"{prefix}.cross_attn_norm_q.weight", eps), f"{prefix}.wq.weight")
    out = o.merge(o.attention(o.heads(q, n_heads, hd), keys, values, mask), dim)
    return g.op("Add", x, o.linear(out, f"{prefix}.wo.weight"))


def _cross_write(o: Ops, latents: str, feeds: dict[str, str]) -> None:
    """BltModel.decoder_cross_kv for the new patches, written into the cross ring in place."""
    g, config = o.g, o.config
    k, D = config.cross_attn_k, config.decoder.dim
    start64 = g.op("Cast", feeds["start"], to=TensorProto.INT64)
    with g.scope("local_decoder"):
        with g.scope("local_decoder.patch_embedding_projection"):
            slots = o.linear(latents, "local_decoder.patch_embedding_projection.weight")  # (B, Pn, k*D)
        slots = g.op("Reshape", slots, g.i64(0, 0, k, D))
        n = config.decoder_cross_layers
        pairs = zip(kv_names(CROSS, n), kv_names(CROSS_PRESENT, n), strict=True)
        for i, (names, outs) in enumerate(pairs):
            prefix = f"local_decoder.cross_attn_layers.{i}"
            with g.scope(prefix):
                kvn = o.rms_norm(slots, f"{prefix}.cross_attn_norm_kv.weight", config.decoder.norm_eps)
                for name, out, lin in zip(names, outs, ("wk", "wv"), strict=True):
                    new = o.linear(kvn, f"{prefix}.{lin}.weight")
                    new = g.op("Reshape", new, g.i64(0, 1, -1, k * D))  # (B, 1, Pn, k*D)
                    g.op("TensorScatter", name, new, start64, axis=-2, mode="circular", outputs=[out])


def _decoder_body(o: Ops, feeds: dict[str, str], x: str, q_pos: str, mask: str, caches, read: str) -> str:
    """BltModel.decoder_layers: input norm, per layer a cross-attention to the read patch's slots
    (x + (x + attn)) and a block; then the head. read (B, S) int32: cross ring slots."""
    g, config = o.g, o.config
    cfg = config.decoder
    with g.scope("local_decoder"):
        if config.decoder_input_norm:
            with g.scope("local_decoder.input_norm"):
                x = o.rms_norm(x, "local_decoder.input_norm.weight", cfg.norm_eps)
        cos, sin = o.rope_tables(q_pos, cfg)
        index = g.op("Unsqueeze", g.op("Cast", read, to=TensorProto.INT64), g.i64(-1))  # (B, S, 1)
        cross = kv_names(CROSS, config.decoder_cross_layers)
        for i in range(cfg.n_layers):
            if i < config.decoder_cross_layers:
                prefix = f"local_decoder.cross_attn_layers.{i}"
                with g.scope(prefix):
                    ring_k, ring_v = (g.op("Squeeze", feeds[n], g.i64(1)) for n in cross[i])  # (B, C, k*D)
                    keys = g.op("GatherND", ring_k, index, batch_dims=1)  # (B, S, k*D)
                    values = g.op("GatherND", ring_v, index, batch_dims=1)
                    slots = _slot_attend(o, prefix, x, keys, values)
                x = g.op("Add", x, slots)  # the doubled residual: x + (x + attn)
            x = o.block(x, f"local_decoder.layers.{i}", cfg, cos, sin, mask, caches[i])
        return o.head(x, "local_decoder", cfg)


def _slot_attend(o: Ops, prefix: str, x: str, keys: str, values: str) -> str:
    """CrossAttention.forward_slots: each position attends over its own k slots (B, S, k*D)."""
    g, config = o.g, o.config
    H, D = config.cross_attn_heads_decoder, config.decoder.dim
    hd = D // H
    q = o.linear(o.rms_norm(x, f"{prefix}.cross_attn_norm_q.weight", config.decoder.norm_eps), f"{prefix}.wq.weight")
    qh = g.op("Reshape", o.f32(q), g.i64(0, 0, 1, H, hd))  # (B, S, 1, H, hd)
    kh = g.op("Reshape", o.f32(keys), g.i64(0, 0, -1, H, hd))  # (B, S, k, H, hd)
    vh = g.op("Reshape", o.f32(values), g.i64(0, 0, -1, H, hd))
    scores = g.op("Mul", g.op("ReduceSum", g.op("Mul", qh, kh), g.i64(-1), keepdims=0), g.scalar(hd**-0.5))
    p = g.op("Unsqueeze", g.op("Softmax", scores, axis=2), g.i64(-1))  # (B, S, k, H, 1)
    out = o.back(g.op("Reshape", g.op("ReduceSum", g.op("Mul", p, vh), g.i64(2), keepdims=0), g.i64(0, 0, D)))
    return g.op("Add", x, o.linear(out, f"{prefix}.wo.weight"))


def _cross_slots(g: Graph, read_patch: str, feeds: dict[str, str]) -> str:
    """Patch ids -> their cross ring slots (patch mod C), int32."""
    C = g.op("Cast", g.op("Gather", g.op("Shape", feeds[f"{CROSS}.0.k"]), g.i64(2), axis=0), to=TensorProto.INT32)
    return g.op("Mod", read_patch, C, fmod=0)


def build_decoder(config: BltConfig, spec: StepSpec, w: Weights, dtype: str) -> Graph:
    g = Graph("decoder", dtype)
    o, feeds, cfg = Ops(g, w, config), _inputs(g, spec), config.decoder
    start64, q_pos, end = step_positions(g, feeds["start"], _new(g, feeds["h"]))
    mask = attention_mask(g, q_pos, slot_positions(g, end, spec.slots, feeds[f"{PAST}.0.k"]), end, cfg.window)
    caches = [
        RingWrite(g, names, outs, start64, spec.ring)
        for names, outs in zip(kv_names(PAST, cfg.n_layers), kv_names(PRESENT, cfg.n_layers), strict=True)
    ]
    read = _cross_slots(g, feeds["read_patch"], feeds)
    logits = _decoder_body(o, feeds, feeds["h"], q_pos, mask, caches, read)
    _outputs(g, spec, {"logits": logits})
    return g


def build_decoder_block(config: BltConfig, spec: StepSpec, w: Weights, dtype: str) -> Graph:
    g = Graph("decoder_block", dtype)
    o, feeds, cfg = Ops(g, w, config), _inputs(g, spec), config.decoder
    S = _new(g, feeds["block_ids"])
    _, q_pos, _ = step_positions(g, feeds["start"], S)
    before = g.op("Sub", g.op("Unsqueeze", feeds["start"], g.i64(1)), g.i32(1))
    cached = attention_mask(g, q_pos, slot_positions(g, before, spec.slots, feeds[f"{PAST}.0.k"]), before, cfg.window)
    inside = g.op("Expand", g.const(np.array(True)), g.op("Concat", g.op("Shape", cached, end=3), S, axis=0))
    mask = g.op("Concat", cached, inside, axis=-1)  # (B, 1, S, slots + S)
    caches = [ReadAfter(g, names) for names in kv_names(PAST, cfg.n_layers)]
    read = g.op(
        "Expand", g.op("Unsqueeze", _cross_slots(g, feeds["read_patch"], feeds), g.i64(1)), g.op("Shape", q_pos)
    )
    with g.scope("local_decoder"):
        emb = g.weight("local_decoder.diffusion_embeddings.weight", w("local_decoder.diffusion_embeddings.weight"))
        x = g.op("Gather", emb, feeds["block_ids"])
    logits = _decoder_body(o, feeds, x, q_pos, mask, caches, read)
    _outputs(g, spec, {"logits": logits})
    return g


BUILDERS = {
    "entropy": build_entropy,
    "encoder": build_encoder,
    "global": build_global,
    "decoder": build_decoder,
    "decoder_block": build_decoder_block,
}


# ------------------------------------------------------------------------------ writing a graph
@dataclass
class GraphRecord:
    """What one export produced: files (relative names), sizes, op counts and time."""

    step: str
    file: str
    external_data: str | None
    bytes: int
    op_counts: dict[str, int]
    initializer_bytes: int
    seconds: float


def export_step(
    config: BltConfig, spec: StepSpec, weights: Weights, path: Path, dtype: str, external_data_threshold: int
) -> GraphRecord:
    """Build one step's graph from `weights` (in `dtype`) and save it to `path` (plus
    `path.name + ".data"` when its initializers exceed `external_data_threshold` bytes)."""
    t0 = time.perf_counter()
    g = BUILDERS[spec.name](config, spec, weights, dtype)
    model = g.model()
    _check_io(model, spec)
    init_bytes = sum(_nbytes(t) for t in model.graph.initializer)
    external = init_bytes > external_data_threshold
    data = path.with_name(path.name + ".data")
    onnx.save(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=data.name)
    op_counts = Counter(node.op_type for node in model.graph.node)
    size = path.stat().st_size + (data.stat().st_size if external else 0)
    return GraphRecord(
        spec.name,
        path.name,
        data.name if external else None,
        size,
        dict(sorted(op_counts.items())),
        init_bytes,
        time.perf_counter() - t0,
    )


def _nbytes(t: onnx.TensorProto) -> int:
    return len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes


def _check_io(model: onnx.ModelProto, spec: StepSpec) -> None:
    """The built graph's I/O names are the spec's, in order: a mismatch is a bug here."""
    for kind, values, tensors in (
        ("inputs", model.graph.input, spec.inputs),
        ("outputs", model.graph.output, spec.outputs),
    ):
        got, want = [v.name for v in values], [t.name for t in tensors]
        if got != want:
            raise InternalError(f"graph {spec.name}: built {kind} {got}, the spec says {want}")


def model_weights(model: torch.nn.Module) -> Weights:
    """The Weights of an in-memory model: its parameters by name, as they are."""
    params = dict(model.named_parameters())
    return lambda name: params[name].detach()
