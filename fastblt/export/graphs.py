"""One ONNX graph per step: the step function wrapped so that torch.export sees exactly the spec.

`StepModule` takes the spec's inputs positionally, in spec order, and returns its outputs in spec
order; `export_step` runs the dynamo exporter on it with one `torch.export.Dim` per named dynamic
dimension (example size >= 2 for every one of them, so nothing specializes to 0/1), names the ONNX
inputs/outputs as the spec does, stamps the spec's shapes on the graph I/O and saves the file.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from fastblt.errors import InternalError
from fastblt.export.reference import run_named_step
from fastblt.export.spec import DYNAMIC_DIMS, TORCH_DTYPES, StepSpec, TensorSpec
from fastblt.model.blt import BltModel

# Example sizes for tracing: all >= 2 and pairwise different, so that the exporter neither
# specializes a dimension to 0/1 nor unifies two dimensions that merely happen to be equal.
EXAMPLE_SIZES = {"batch": 2, "new": 3, "patches": 4, "patch_len": 5}


@dataclass(frozen=True)
class DimRange:
    """The range a named dynamic dimension may take at run time (recorded in the manifest)."""

    min: int
    max: int

    def to_dict(self) -> dict:
        return {"min": self.min, "max": self.max}


def dim_ranges(capacity: int, patch_capacity: int, max_batch: int, max_patch_length: int | None) -> dict:
    """Named dynamic dims -> DimRange: S new positions fill at most the cache, Pn new patches the
    patch cache, and a patch is at most max_patch_length (or the whole context) bytes long."""
    return {
        "batch": DimRange(1, max_batch),
        "new": DimRange(1, capacity),
        "patches": DimRange(1, patch_capacity),
        "patch_len": DimRange(1, min(capacity, max_patch_length or capacity)),
    }


class StepModule(nn.Module):
    """forward(*inputs in spec order) -> outputs in spec order, through the reference step."""

    def __init__(self, model: BltModel, spec: StepSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        feeds = {t.name: x for t, x in zip(self.spec.inputs, inputs, strict=True)}
        out = run_named_step(self.model, self.spec.name, feeds)
        return tuple(out[t.name] for t in self.spec.outputs)


def _example(t: TensorSpec, sizes: dict[str, int], device: str | torch.device = "cpu") -> Tensor:
    """An example input: small valid indices for int32 inputs; uninitialized floats (tracing never
    reads them, and `empty` leaves the pages of large static caches untouched)."""
    shape = [sizes[d] if isinstance(d, str) else d for d in t.shape]
    if t.dtype == "int32":
        return torch.ones(shape, dtype=torch.int32, device=device)
    return torch.empty(shape, dtype=TORCH_DTYPES[t.dtype], device=device)


def example_inputs(spec: StepSpec, sizes: dict[str, int] | None = None, device="cpu") -> tuple[Tensor, ...]:
    sizes = {**EXAMPLE_SIZES, **(sizes or {})}
    return tuple(_example(t, sizes, device) for t in spec.inputs)


def dynamic_shapes(spec: StepSpec, ranges: dict[str, DimRange]) -> tuple:
    """One torch.export.Dim per named dim (shared across inputs), as export wants for *inputs."""
    dims = {}
    for name in DYNAMIC_DIMS:
        r = ranges[name]
        # the Dim's range must contain the example size (>= 2) even where the runtime range is 1
        dims[name] = torch.export.Dim(name, min=1, max=max(r.max, EXAMPLE_SIZES[name] + 1))
    per_input = tuple(
        {axis: dims[d] for axis, d in enumerate(t.shape) if isinstance(d, str)} or None for t in spec.inputs
    )
    return (per_input,)


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


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter's warnings, logs and prints go nowhere (stdout stays clean for --json)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_step(
    model: BltModel,
    spec: StepSpec,
    path: Path,
    opset: int,
    ranges: dict[str, DimRange],
    external_data_threshold: int,
) -> GraphRecord:
    """Export one step of `model` to `path` (plus `path.name + ".data"` when its initializers exceed
    `external_data_threshold` bytes). The model's weights must already have the target dtype."""
    t0 = time.perf_counter()
    module = StepModule(model, spec).eval()
    with quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module,
            example_inputs(spec),
            dynamo=True,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_shapes=dynamic_shapes(spec, ranges),
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    _stamp_spec_shapes(program.model, spec)
    init_bytes = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value)
    external = init_bytes > external_data_threshold
    with quiet_exporter():
        program.save(str(path), external_data=external)
    op_counts = Counter(node.op_type for node in program.model.graph.all_nodes())
    del program, module
    _drop_rewriter_references()
    data = path.with_name(path.name + ".data")
    has_data = data.exists()
    size = path.stat().st_size + (data.stat().st_size if has_data else 0)
    return GraphRecord(
        spec.name,
        path.name,
        data.name if has_data else None,
        size,
        dict(sorted(op_counts.items())),
        init_bytes,
        time.perf_counter() - t0,
    )


_IR_DTYPES = {"int32": "INT32", "float32": "FLOAT", "float16": "FLOAT16", "bfloat16": "BFLOAT16"}


def _drop_rewriter_references() -> None:
    """Let the exported graph's initializers go.

    onnxscript's rewrite rules are module-level objects whose matchers keep the last graph they
    matched (`_graph`, `_current_node`, `_match`), and through it every initializer of that
    export (onnxscript 0.7). Without this, a BLT-1B encoder's 11 GiB of hash embeddings stay
    alive while the next graph exports. Each `match` call sets these fields afresh.
    """
    try:
        from onnxscript.rewriter._matcher import PatternMatcher
    except ImportError:  # another onnxscript layout: nothing we know to release
        PatternMatcher = None
    if PatternMatcher is not None:
        with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
            warnings.simplefilter("ignore")
            matchers = [obj for obj in gc.get_objects() if isinstance(obj, PatternMatcher)]
        for obj in matchers:
            for attr in ("_graph", "_current_node", "_match"):
                if attr in obj.__dict__:
                    obj.__dict__[attr] = None
    gc.collect()


def _stamp_spec_shapes(model, spec: StepSpec) -> None:
    """Give every graph input/output the spec's name, dtype and shape (named dims as dim_params).

    A name or dtype the exporter produced differently is a bug here, not something to paper over.
    """
    import onnx_ir as ir

    for values, tensors in ((model.graph.inputs, spec.inputs), (model.graph.outputs, spec.outputs)):
        if [v.name for v in values] != [t.name for t in tensors]:
            raise InternalError(
                f"graph {spec.name}: exported I/O names {[v.name for v in values]}, "
                f"expected {[t.name for t in tensors]}"
            )
        for v, t in zip(values, tensors, strict=True):
            want = ir.DataType[_IR_DTYPES[t.dtype]]
            if v.dtype != want:
                raise InternalError(
                    f"graph {spec.name} | tensor {t.name}: exported dtype {v.dtype}, expected {t.dtype}"
                )
            if v.shape is not None and len(v.shape) != len(t.shape):
                raise InternalError(
                    f"graph {spec.name} | tensor {t.name}: exported rank {len(v.shape)}, expected shape {t.shape}"
                )
            v.shape = ir.Shape(list(t.shape))


class _ParameterRecorder(TorchFunctionMode):
    """Records every nn.Parameter passed to a torch function while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in (*args, *kwargs.values()):
            for x in a if isinstance(a, (list, tuple)) else (a,):
                if isinstance(x, nn.Parameter):
                    self.seen.add(id(x))
        return func(*args, **kwargs)


def step_parameter_names(model: BltModel, spec: StepSpec) -> list[str]:
    """The parameters a step reads, found by running it on the meta device (no compute, no memory).

    Lets a caller materialize one graph's weights at a time (benchmarks/export_bench.py exports a
    BLT-1B-shaped model in a fraction of its full size). `model` must live on the meta device.
    """
    if any(p.device.type != "meta" for p in model.parameters()):
        raise InternalError("step_parameter_names: the model must be on the meta device")
    recorder = _ParameterRecorder()
    with recorder, torch.no_grad():
        StepModule(model, spec)(*example_inputs(spec, device="meta"))
    return [name for name, p in model.named_parameters() if id(p) in recorder.seen]


@contextlib.contextmanager
def materialized(model: BltModel, names: list[str], make) -> Iterator[None]:
    """Give the meta-device parameters `names` real values `make(name, meta_param) -> Tensor` while
    the block runs, then put the meta parameters back (the real tensors are freed)."""
    saved = []
    try:
        for name in names:
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            meta = module._parameters[leaf]
            saved.append((module, leaf, meta))
            module._parameters[leaf] = nn.Parameter(make(name, meta), requires_grad=False)
        yield
    finally:
        for module, leaf, meta in reversed(saved):
            module._parameters[leaf] = meta
        gc.collect()
