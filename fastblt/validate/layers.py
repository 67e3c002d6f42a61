"""Per-layer localisation: when a graph fails, name the first module whose output diverges.

The ONNX side is polygraphy's "mark all" idea: a debug copy of the step graph with every float
intermediate value added as a graph output, run in onnxruntime (CPU) through polygraphy's
`OnnxrtRunner` and `Comparator.run`. The torch side is the reference step with forward hooks on
every module. The dynamo exporter records, on every ONNX node, the module scopes it came from
(`pkg.torch.onnx.name_scopes`, e.g. ['', 'model.local_decoder.layers.1', ...]); a module's
output on the ONNX side is a value produced inside its scope and read outside it (or a graph
output) with the shape of the torch module's output. The graph's own outputs (a cache entry
`present.{i}.k` made inside an attention, say) are rows too, gated exactly as the graph is (module
rows may exceed the gate by 1e-5 x max|ref|, since activations grow). Rows are checked in graph
order (the producing node's topological index; ties in the order forwards return, so a Linear
before the block holding it), and the first failing row is the most specific place the error
appears; its enclosing layer (`...layers.{i}` / `...cross_attn_layers.{i}`) is named too.

A torch candidate in reduced precision is localised the same way with hooks on both models.
Caveat (deploy_notes 1.7): marking outputs can change fusions; when no module diverges in the
debug graph, the report says so instead of naming one.
"""

from __future__ import annotations

import ast
import math
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastblt.export.reference import run_named_step
from fastblt.model.blt import BltModel
from fastblt.validate.metrics import to_numpy

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
LAYER_RE = re.compile(r"^(.*\.)?(layers|cross_attn_layers)\.\d+$")
FLOAT_ELEM = {1, 10, 16}  # onnx FLOAT, FLOAT16, BFLOAT16
LAYER_RTOL = 1e-5  # fp32: a module passes if max_abs <= atol + LAYER_RTOL * max|ref| (activations grow)


@dataclass
class LayerRow:
    """One module's output, candidate vs reference."""

    module: str
    value: str | None  # the ONNX value compared (None for torch-vs-torch)
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    cosine: float
    ref_absmax: float
    passed: bool
    order: int = 0  # position in the graph (producing node), the order rows are checked in
    graph_output: bool = False  # a graph output (gated as the graph is), not a module's output

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "graph_output": self.graph_output,
            "onnx_value": self.value,
            "shape": list(self.shape),
            "max_abs": _num(self.max_abs),
            "mean_abs": _num(self.mean_abs),
            "cosine": _num(self.cosine),
            "ref_absmax": _num(self.ref_absmax),
            "passed": self.passed,
        }


@dataclass
class LayerResult:
    """Per-module errors of one failed graph on one case, and the first diverging module."""

    graph: str
    case: str
    rows: list[LayerRow] = field(default_factory=list)
    atol: float = 1e-4
    cosine: float | None = None  # reduced precision: the per-module gate is cosine
    unmatched: list[str] = field(default_factory=list)  # modules with no ONNX value to compare
    note: str = ""

    @property
    def first(self) -> LayerRow | None:
        return next((r for r in self.rows if not r.passed), None)

    @property
    def first_layer(self) -> str | None:
        """The layer (`...layers.i`) holding the first diverging module, or the module itself."""
        first = self.first
        if first is None:
            return None
        parts = first.module.split(".")
        for k in range(len(parts), 0, -1):
            if LAYER_RE.match(".".join(parts[:k])):
                return ".".join(parts[:k])
        return first.module

    def describe_first(self) -> str:
        f = self.first
        if f is None:
            return f"none found ({self.note or 'every module matches'})"
        what = f"module {f.module}" + (f", value {f.value}" if f.value else "")
        return f"{self.first_layer} ({what}: max_abs {f.max_abs:.3g}, cosine {f.cosine:.6f}; case {self.case})"

    def to_dict(self) -> dict[str, Any]:
        f = self.first
        return {
            "graph": self.graph,
            "case": self.case,
            "first_module": None if f is None else f.module,
            "first_layer": self.first_layer,
            "atol": self.atol,
            "cosine_gate": self.cosine,
            "note": self.note,
            "unmatched_modules": self.unmatched,
            "rows": [r.to_dict() for r in self.rows],
        }

    def markdown_lines(self) -> Iterator[str]:
        yield f"Case: {self.case}. First diverging: {self.describe_first()}."
        if self.note:
            yield ""
            yield self.note
        yield ""
        yield "| # | module | onnx value | max abs | cosine | result |"
        yield "|---|---|---|---|---|---|"
        for i, r in enumerate(self.rows):
            mark = "pass" if r.passed else ("**FIRST**" if r is self.first else "fail")
            yield f"| {i} | {r.module} | {r.value or '—'} | {r.max_abs:.3g} | {r.cosine:.6f} | {mark} |"


# ------------------------------------------------------------------------------ torch side
def capture_modules(
    model: BltModel, step: str, feeds: dict[str, Tensor]
) -> tuple[list[tuple[str, Tensor]], dict[str, Tensor]]:
    """Run the reference step with forward hooks: (module name, first tensor output) in the order
    forwards return (a module called more than once keeps its first call), and the step's outputs."""
    names = {m: n for n, m in model.named_modules() if n}
    seen: dict[str, Tensor] = {}
    order: list[str] = []

    def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        name = names[mod]
        t = out[0] if isinstance(out, (tuple, list)) else out
        if name not in seen and isinstance(t, Tensor):
            seen[name] = t.detach().clone()
            order.append(name)

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.inference_mode():
            outputs = run_named_step(model, step, feeds)
    finally:
        for h in handles:
            h.remove()
    return [(n, seen[n]) for n in order], {k: v.detach().clone() for k, v in outputs.items()}


# ------------------------------------------------------------------------------ onnx side
def debug_graph(onnx_path: Path, out_dir: Path) -> tuple[Path, list[str]]:
    """A copy of the graph with every float intermediate value marked as an output ("mark all").

    Returns the debug model's path and the names of the marked values.
    """
    import onnx

    model = onnx.load(str(onnx_path))  # loads external data from next to the file
    g = model.graph
    if not g.value_info:
        model = onnx.shape_inference.infer_shapes(model)
        g = model.graph
    existing = {o.name for o in g.output}
    inits = {i.name for i in g.initializer}
    produced = {o for n in g.node for o in n.output}
    marked = []
    for vi in g.value_info:
        if vi.name in existing or vi.name in inits or vi.name not in produced:
            continue
        if vi.type.tensor_type.elem_type in FLOAT_ELEM:
            g.output.append(vi)
            marked.append(vi.name)
    path = out_dir / f"debug.{onnx_path.stem}.onnx"
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data"
    )
    return path, marked


def run_debug_graph(path: Path, feeds: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Run the debug graph once in onnxruntime CPU through polygraphy (OnnxrtRunner + Comparator)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator

    from fastblt.validate.graphs import quiet_polygraphy

    feed = {k: v.detach().cpu().numpy() for k, v in feeds.items()}
    runner = OnnxrtRunner(SessionFromOnnx(str(path), providers=["cpu"]), name="onnxrt-debug")
    with quiet_polygraphy():
        results = Comparator.run([runner], data_loader=[feed])
    return {k: np.asarray(v) for k, v in results[0][1][0].items()}


@dataclass
class GraphScopes:
    """Where each ONNX value comes from: producing node index (topological) and module scopes."""

    module_values: dict[str, list[str]]  # module -> values made inside it and read outside it
    producer: dict[str, int]  # value -> index of the node that makes it
    innermost: dict[str, str | None]  # value -> the innermost module scope of its producer


def graph_scopes(onnx_path: Path, model: BltModel) -> GraphScopes:
    """Read the exporter's name scopes off every node of the graph (no weights loaded)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    g = proto.graph
    modules = {n for n, _ in model.named_modules() if n}
    node_mods: list[list[str]] = []
    for node in g.node:
        raw = next((p.value for p in node.metadata_props if p.key == SCOPES_KEY), None)
        scopes = ast.literal_eval(raw) if raw else []
        node_mods.append([m for sc in scopes[1:-1] if (m := _module_name(sc, modules)) is not None])
    graph_outputs = {o.name for o in g.output}
    producer: dict[str, int] = {o: i for i, node in enumerate(g.node) for o in node.output}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(g.node):
        for x in node.input:
            consumers.setdefault(x, []).append(i)
    out: dict[str, list[str]] = {}
    for value, i in producer.items():
        for mod in node_mods[i]:
            users = consumers.get(value, [])
            if value in graph_outputs or any(mod not in node_mods[j] for j in users):
                out.setdefault(mod, []).append(value)
    innermost = {v: (node_mods[i][-1] if node_mods[i] else None) for v, i in producer.items()}
    return GraphScopes(out, producer, innermost)


def module_values(onnx_path: Path, model: BltModel) -> dict[str, list[str]]:
    """Module name -> the values produced inside its scope and read outside it, in graph order."""
    return graph_scopes(onnx_path, model).module_values


def _module_name(scope: str, modules: set[str]) -> str | None:
    """'model.local_decoder.layers.0' -> 'local_decoder.layers.0' (the wrapper's prefix dropped)."""
    parts = scope.split(".")
    for k in range(len(parts)):
        name = ".".join(parts[k:])
        if name in modules:
            return name
    return None


# ------------------------------------------------------------------------------ localisation
def localise_onnx(
    model: BltModel,
    step: str,
    onnx_path: str | Path,
    feeds: dict[str, Tensor],
    case: str,
    atol: float = 1e-4,
    cosine: float | None = None,
) -> LayerResult:
    """Per-module errors of the ONNX graph `onnx_path` (run in ORT CPU) against the torch reference.

    `feeds` in the graph's dtypes; the torch reference runs on them in fp32.
    """
    onnx_path = Path(onnx_path)
    result = LayerResult(step, case, atol=atol, cosine=cosine)
    if any(v.dtype == torch.bfloat16 for v in feeds.values()):
        result.note = "bfloat16 graph: onnxruntime CPU cannot run it, so it was not localised here"
        return result
    feeds32 = {k: v.float() if v.is_floating_point() else v for k, v in feeds.items()}
    ref, ref_outputs = capture_modules(model, step, feeds32)
    scopes = graph_scopes(onnx_path, model)
    with tempfile.TemporaryDirectory(prefix="fastblt-layers-") as tmp:
        debug, _ = debug_graph(onnx_path, Path(tmp))
        got = run_debug_graph(debug, feeds)
    for name, t in ref:
        want = tuple(t.shape)
        cands = [v for v in scopes.module_values.get(name, []) if v in got and got[v].size == t.numel()]
        exact = [v for v in cands if tuple(got[v].shape) == want]
        cands = exact or cands
        if not cands:
            result.unmatched.append(name)
            continue
        rows = [_row(name, v, t, got[v].reshape(want), atol, cosine) for v in cands]
        best = min(rows, key=lambda r: r.max_abs if math.isfinite(r.max_abs) else math.inf)
        best.order = scopes.producer.get(best.value, 0)
        result.rows.append(best)
    for name, t in ref_outputs.items():  # the graph's own outputs, gated as the graph is
        if name in got and got[name].size == t.numel():
            module = scopes.innermost.get(name) or step
            row = _row(module, name, t, got[name].reshape(t.shape), atol, cosine, strict=True)
            row.order, row.graph_output = scopes.producer.get(name, 0), True
            result.rows.append(row)
    result.rows.sort(key=lambda r: r.order)
    if not result.rows:
        result.note = "no module of the graph could be matched to an ONNX value (no name scopes in the graph?)"
    elif result.first is None:
        result.note = (
            "nothing diverges in the debug graph run in onnxruntime: the difference is in the candidate "
            "runtime (e.g. a TensorRT engine), or marking every output changed a fusion"
        )
    return result


def localise_torch(
    ref_model: BltModel,
    cand_model: BltModel,
    step: str,
    feeds: dict[str, Tensor],
    cand_feeds: dict[str, Tensor],
    case: str,
    atol: float = 1e-4,
    cosine: float | None = None,
) -> LayerResult:
    """Per-module errors of a torch candidate (e.g. bf16 weights) against the fp32 reference."""
    result = LayerResult(step, case, atol=atol, cosine=cosine)
    ref, _ = capture_modules(ref_model, step, feeds)
    cand = dict(capture_modules(cand_model, step, cand_feeds)[0])
    for name, t in ref:
        c = cand.get(name)
        if c is None or c.numel() != t.numel():
            result.unmatched.append(name)
            continue
        result.rows.append(_row(name, None, t, c.reshape(t.shape), atol, cosine))
    if result.rows and result.first is None:
        result.note = "no module diverges beyond the per-module gate"
    return result


def _row(
    name: str, value: str | None, ref: Tensor, cand: Any, atol: float, cosine: float | None, strict: bool = False
) -> LayerRow:
    """One comparison; module outputs may exceed `atol` by LAYER_RTOL * max|ref| (activations grow),
    graph outputs (`strict`) may not."""
    r, c = to_numpy(ref).astype(np.float64), to_numpy(cand).astype(np.float64)
    ok = np.isfinite(c)
    diff = np.where(ok, np.abs(c - r), np.inf)
    max_abs = float(diff.max()) if diff.size else 0.0
    mean_abs = float(np.where(ok, diff, 0).mean()) if diff.size else 0.0
    rz, cz = r.ravel(), np.where(ok, c, 0).ravel()
    nr, nc = float(np.linalg.norm(rz)), float(np.linalg.norm(cz))
    cos = 1.0 if nr == 0 and nc == 0 else (float(rz @ cz) / (nr * nc) if nr > 0 and nc > 0 else 0.0)
    ref_absmax = float(np.abs(r).max()) if r.size else 0.0
    if cosine is not None:
        passed = bool(ok.all()) and cos >= cosine
    else:
        passed = bool(ok.all()) and max_abs <= atol + (0.0 if strict else LAYER_RTOL * ref_absmax)
    return LayerRow(name, value, tuple(ref.shape), max_abs, mean_abs, cos, ref_absmax, passed)


def _num(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None
