"""The checks every exported graph must pass (run at the end of every export and by
`fastblt export --check DIR`):

- `onnx`: onnx.checker with full (strict) shape inference.
- `io`: graph inputs/outputs are the spec's, in order, with its dtypes and shapes.
- `trt_ops`: every op is in TensorRT's supported ONNX operator list (trt_ops.txt, with its source),
  with a supported data type and build-time-constant inputs where the list demands them, and the
  model's opset is in the list's range.
- `hash_ids`: no arithmetic on hashed values inside the graph (hash ids are computed on the host
  and may only be sliced, cast, offset by a constant table base and used as gather indices), and
  no int64 Mod/Pow/BitShift anywhere (the signature of hashing; positions are int32).
- `ort`: the graph loads in onnxruntime (CPU). A bfloat16 graph that ORT CPU cannot load is
  skipped with ORT's reason (bf16 graphs are for GPUs / TensorRT).

Results are data (`CheckResult`); `ExportCheckFailed` carries them when a gate fails.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import onnx

from fastblt.errors import FastBltError
from fastblt.export.spec import StepSpec

CHECKS = ("onnx", "io", "trt_ops", "hash_ids", "ort")
TRT_OPS_FILE = Path(__file__).with_name("trt_ops.txt")

_ONNX_TO_SPEC = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT32: "int32",
}
_ONNX_TO_TRT = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.FLOAT8E4M3FN: "FP8",
    onnx.TensorProto.DOUBLE: "DOUBLE",
    onnx.TensorProto.INT16: "INT16",
    onnx.TensorProto.UINT32: "UINT32",
    onnx.TensorProto.UINT64: "UINT64",
}
# Ops that move hashed values around without computing on them (input 0 is the data).
_HASH_PASS = {"Cast", "Identity", "Slice", "Squeeze", "Unsqueeze", "Reshape", "Transpose", "Split", "Concat",
              "Expand", "Flatten", "Tile", "Gather", "GatherElements", "GatherND"}  # fmt: skip
# Ops that may consume hashed values without producing hashed values.
_HASH_SINK = {"Shape", "Size"}
_GATHERS = {"Gather", "GatherElements", "GatherND"}
_HASH_LIKE_INT64 = {"Mod", "Pow", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot"}


@dataclass(frozen=True)
class CheckResult:
    check: str
    status: str  # "pass" | "fail" | "skip"
    detail: str = ""

    def to_dict(self) -> dict:
        return {"status": self.status, "detail": self.detail}


class ExportCheckFailed(FastBltError):
    """A graph failed one of its checks (the CLI exits 1)."""

    def __init__(self, message: str, results: dict[str, list[CheckResult]] | None = None):
        super().__init__(message)
        self.results = results or {}


@dataclass(frozen=True)
class TrtOpTable:
    """TensorRT's supported ONNX operators: accepted data types and inputs that must be constant."""

    opset_min: int
    opset_max: int
    types: dict[str, frozenset[str]]
    const_inputs: dict[str, tuple[int, ...]]
    source: str


@cache
def load_trt_ops(path: Path = TRT_OPS_FILE) -> TrtOpTable:
    """Parse trt_ops.txt (see its header for the format and the source it was copied from)."""
    text = Path(path).read_text()
    source = " ".join(re.findall(r"https://\S+", text)[:1])
    opset, types, const = None, {}, {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split()
        if not line:
            continue
        if line[0] == "opset":
            opset = (int(line[1]), int(line[2]))
            continue
        op, type_list, *rest = line
        types[op] = frozenset(type_list.split(","))
        for extra in rest:
            if extra.startswith("const="):
                const[op] = tuple(int(i) for i in extra[len("const=") :].split(","))
    if opset is None or not types:
        raise FastBltError(f"{path}: no `opset MIN MAX` line or no operators")
    return TrtOpTable(opset[0], opset[1], types, const, source)


# ------------------------------------------------------------------------------ the checks
def check_graph(path: Path, spec: StepSpec, opset: int, table: TrtOpTable | None = None) -> list[CheckResult]:
    """Run every check on the graph file `path` (external data next to it) against `spec`."""
    table = table or load_trt_ops()
    results = [_check_onnx(path)]
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # not even a readable ModelProto
        unreadable = f"{path.name}: unreadable: {_one_line(e)}"
        return [*results, *(CheckResult(c, "fail", unreadable) for c in ("io", "trt_ops", "hash_ids", "ort"))]
    try:
        typed = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False)
    except Exception:  # a graph that fails inference already failed `onnx`; check the raw graph
        typed = proto
    results.append(check_io(proto, spec))
    results.append(check_trt_ops(typed, opset, table))
    results.append(check_hash_ids(typed))
    results.append(_check_ort(path, spec))
    return results


def failures(results: list[CheckResult]) -> list[CheckResult]:
    return [r for r in results if r.status == "fail"]


def _check_onnx(path: Path) -> CheckResult:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # ValidationError, InferenceError, or an unreadable file
        return CheckResult("onnx", "fail", f"{path.name}: {_one_line(e)}")
    return CheckResult("onnx", "pass", "onnx.checker, full_check=True (strict shape inference)")


def _shape_of(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in vi.type.tensor_type.shape.dim]


def check_io(proto: onnx.ModelProto, spec: StepSpec) -> CheckResult:
    g = proto.graph
    inits = {t.name for t in g.initializer}
    for kind, values, tensors in (
        ("input", [v for v in g.input if v.name not in inits], spec.inputs),
        ("output", list(g.output), spec.outputs),
    ):
        names = [v.name for v in values]
        if names != [t.name for t in tensors]:
            return CheckResult("io", "fail", f"{kind} names {names}, expected {[t.name for t in tensors]}")
        for v, t in zip(values, tensors, strict=True):
            dtype = _ONNX_TO_SPEC.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type))
            if dtype != t.dtype:
                return CheckResult("io", "fail", f"{kind} {t.name}: dtype {dtype}, expected {t.dtype}")
            if _shape_of(v) != list(t.shape):
                return CheckResult("io", "fail", f"{kind} {t.name}: shape {_shape_of(v)}, expected {list(t.shape)}")
    return CheckResult("io", "pass", f"{len(spec.inputs)} inputs, {len(spec.outputs)} outputs as in the spec")


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, including those of subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            for sub in attr.graphs:
                yield from _nodes(sub)


def _elem_types(proto: onnx.ModelProto) -> dict[str, int]:
    g = proto.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    for node in g.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def check_trt_ops(proto: onnx.ModelProto, opset: int, table: TrtOpTable) -> CheckResult:
    model_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if model_opset != opset:
        return CheckResult("trt_ops", "fail", f"model opset {model_opset}, expected {opset}")
    if not table.opset_min <= opset <= table.opset_max:
        return CheckResult(
            "trt_ops", "fail", f"opset {opset} outside TensorRT's range {table.opset_min}..{table.opset_max}"
        )
    if len(proto.functions):
        return CheckResult("trt_ops", "fail", f"model-local functions {[f.name for f in proto.functions]}")
    types = _elem_types(proto)
    constants = {t.name for t in proto.graph.initializer}
    constants |= {n.output[0] for n in proto.graph.node if n.op_type == "Constant"}
    problems = []
    for node in _nodes(proto.graph):
        where = f"{node.op_type} node {node.name!r}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom domain {node.domain!r}")
            continue
        if node.op_type not in table.types:
            problems.append(f"{where}: not in TensorRT's operator list")
            continue
        data = 1 if node.op_type == "Where" else 0
        if len(node.input) > data and node.input[data] in types:
            t = _ONNX_TO_TRT.get(types[node.input[data]], str(types[node.input[data]]))
            if t not in table.types[node.op_type]:
                problems.append(f"{where}: data type {t}, TensorRT accepts {sorted(table.types[node.op_type])}")
        for i in table.const_inputs.get(node.op_type, ()):
            if len(node.input) > i and node.input[i] and node.input[i] not in constants:
                problems.append(f"{where}: input {i} ({node.input[i]}) must be a build-time constant")
    if problems:
        return CheckResult("trt_ops", "fail", f"{len(problems)} problem(s): " + "; ".join(problems[:5]))
    n_ops = len({n.op_type for n in _nodes(proto.graph)})
    return CheckResult("trt_ops", "pass", f"{n_ops} op types, all supported (list: {table.source})")


def check_hash_ids(proto: onnx.ModelProto) -> CheckResult:
    types = _elem_types(proto)
    constants = {t.name for t in proto.graph.initializer}
    tainted = {v.name for v in proto.graph.input if v.name == "hash_ids"}
    problems = []
    for node in _nodes(proto.graph):
        if node.op_type in _HASH_LIKE_INT64 and any(types.get(i) == onnx.TensorProto.INT64 for i in node.input):
            problems.append(f"{node.op_type} node {node.name!r} computes on int64 (hash-like arithmetic)")
        hit = [i for i, name in enumerate(node.input) if name in tainted]
        if not hit:
            continue
        if node.op_type in _HASH_SINK or (node.op_type in _GATHERS and hit == [1]):
            continue  # shape queries, or hash ids used as gather indices: fine
        if node.op_type in _HASH_PASS and (node.op_type not in _GATHERS or hit == [0]):
            tainted.update(o for o in node.output if o)
            continue
        if node.op_type == "Add" and len(hit) == 1 and node.input[1 - hit[0]] in constants:
            tainted.update(o for o in node.output if o)  # a table's base row: still only an index
            continue
        dtype = _ONNX_TO_TRT.get(types.get(node.input[hit[0]], 0), "?")
        problems.append(f"{node.op_type} node {node.name!r} computes on hashed values ({dtype})")
    if problems:
        return CheckResult("hash_ids", "fail", "; ".join(problems[:5]))
    what = "hash_ids only sliced/cast/offset/gathered" if tainted else "no hash_ids input"
    return CheckResult("hash_ids", "pass", f"{what}; no int64 Mod/Pow/BitShift")


def _check_ort(path: Path, spec: StepSpec) -> CheckResult:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    # load check only: skip pre-packing weight copies (halves peak memory for big graphs)
    options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        del session
    except Exception as e:
        bf16 = any(t.dtype == "bfloat16" for t in (*spec.inputs, *spec.outputs))
        if bf16 and "NOT_IMPLEMENTED" in str(e):
            return CheckResult(
                "ort", "skip", f"onnxruntime CPU has no bfloat16 kernel: {_one_line(e)} (bf16 graphs are for GPUs)"
            )
        return CheckResult("ort", "fail", f"{path.name}: {_one_line(e)}")
    return CheckResult("ort", "pass", f"loads in onnxruntime {ort.__version__} (CPU)")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:400]}"
