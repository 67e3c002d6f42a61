"""A small fake `tensorrt` module and a synthetic export, for testing the trt code on a CPU.

The fake implements only the calls fastblt makes, with the semantics the TensorRT Python API
documents (see fastblt/engines/trt/build.py and trt_backend.py for the sources):
- Builder / network / parser / config / profile record every call (tests assert on them);
  `parse_from_file` reads the graph's input names from the ONNX file (onnx.load, no weights);
  flavor "11" has no STRONGLY_TYPED flag and no precision BuilderFlags (removed in TRT 11:
  touching them raises AttributeError, as a removed attribute would).
- The "plan" is JSON (the I/O, its named shapes and the profiles); `deserialize_cuda_engine`
  turns it into a FakeEngine.
- FakeContext checks input shapes against its profile's min/max (as TensorRT does), reads its
  inputs from the *addresses* bound with set_tensor_address (ctypes, CPU memory) and writes the
  outputs of an executor (the torch reference step) to the bound output addresses. An input
  bound at the same address as an output is that output's buffer, as in TensorRT: the executor
  gets the memory at the address itself and its in-place cache update lands there (in the
  caller's cache); every other input is a copy, never written. So the backend's binding,
  aliasing, profile selection and copies are tested; TensorRT's numerics are not.

Nothing here measures a GPU or TensorRT; no result of these fakes is a TensorRT result.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import json
import math
import types
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper

from fastblt.export.manifest import FORMAT, FORMAT_VERSION, write_manifest
from fastblt.export.options import ExportOptions
from fastblt.export.spec import DEFAULT_MAX_STEP, OPSET, TORCH_DTYPES, StepSpec, dim_ranges
from fastblt.model.config import BltConfig

_ONNX_TYPES = {"int32": TensorProto.INT32, "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


# ------------------------------------------------------------------------------ synthetic export
def write_fake_export(
    out: Path, config: BltConfig, max_step: int = DEFAULT_MAX_STEP, max_batch: int = 2
) -> tuple[dict, dict[str, StepSpec]]:
    """An export directory in the real manifest format (format_version 2: options, dims with
    `past`, per-graph spec dicts with slots, max_step and aliases, as fastblt/export/exporter.py
    writes them) whose .onnx files declare the specs' I/O (names, dtypes, named dims) but hold no
    nodes: enough for the builder's parse and the manifest checks, not a computation."""
    options = ExportOptions(dtype="float32", max_step=max_step, max_batch=max_batch)
    specs = options.specs(config)
    out.mkdir(parents=True, exist_ok=True)
    ranges = dim_ranges(config, options.max_step, options.max_batch)
    graphs = {}
    for step, spec in specs.items():

        def info(t):
            return helper.make_tensor_value_info(t.name, _ONNX_TYPES[t.dtype], list(t.shape))

        graph = helper.make_graph([], step, [info(t) for t in spec.inputs], [info(t) for t in spec.outputs])
        path = out / f"{step}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)
        graphs[step] = {
            "file": path.name,
            "external_data": None,
            "sha256": {path.name: hashlib.sha256(path.read_bytes()).hexdigest()},
            "opset": options.opset,
            **spec.to_dict(),
        }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "checkpoint": {"hash": "0" * 64, "source": "tests", "config": config.to_dict()},
        "options": options.key(),
        "dims": {name: r.to_dict() for name, r in ranges.items()},
        "graphs": graphs,
    }
    write_manifest(out, manifest)
    return manifest, specs


# ------------------------------------------------------------------------------ memory at an address
def tensor_at(ptr: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """A tensor viewing CPU memory at `ptr` (what a device pointer is to TensorRT)."""
    n = math.prod(shape)
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    buf = (ctypes.c_char * max(nbytes, 1)).from_address(ptr)
    return torch.frombuffer(buf, dtype=dtype, count=n).view(tuple(shape))


# ------------------------------------------------------------------------------ the fake module
class _Enum:
    def __init__(self, name: str, value: int):
        self.name, self.value = name, value

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return self.name


def _enum(cls_name: str, *names: str) -> type:
    return type(cls_name, (), {n: _Enum(n, i) for i, n in enumerate(names)})


class FakeTensor:
    def __init__(self, name: str):
        self.name = name


class FakeNetwork:
    def __init__(self, flags: int):
        self.flags = flags
        self.inputs: list[str] = []
        self.outputs: list[dict] = []
        self.source = None

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> FakeTensor:
        return FakeTensor(self.inputs[i])


class FakeParser:
    def __init__(self, network: FakeNetwork, logger, fail: bool = False):
        self.network, self.fail = network, fail
        self.num_errors = 0

    def parse_from_file(self, path: str) -> bool:
        if self.fail:
            self.num_errors = 1
            return False
        model = onnx.load(path, load_external_data=False)
        elem = {v: k for k, v in _ONNX_TYPES.items()}

        def named(v):
            dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            return {"name": v.name, "dtype": elem[v.type.tensor_type.elem_type], "shape": dims}

        self.network.inputs = [v.name for v in model.graph.input]
        io = [(named(v), True) for v in model.graph.input]
        self.network.io = io + [(named(v), False) for v in model.graph.output]
        self.network.source = path
        return True

    def get_error(self, i: int) -> str:
        return "fake parse error: unsupported node"


class FakeProfile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name, min, opt, max) -> None:  # noqa: A002  (TensorRT's parameter names)
        for a, b in zip(min, max, strict=True):
            assert 1 <= a <= b, f"bad profile for {name}: {min} {max}"
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))


class FakeTimingCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self) -> bytes:
        return self.data + b"+tuned"


class FakeConfig:
    def __init__(self, trt):
        self.trt = trt
        self.calls: list[tuple] = []
        self.profiles: list[FakeProfile] = []
        self.cache = None

    def set_memory_pool_limit(self, pool, n) -> None:
        self.calls.append(("set_memory_pool_limit", pool.name, n))

    def set_flag(self, flag) -> None:
        self.calls.append(("set_flag", flag.name))

    def clear_flag(self, flag) -> None:
        self.calls.append(("clear_flag", flag.name))

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> FakeTimingCache | None:
        self.calls.append(("create_timing_cache", bytes(data)))
        return None if data.startswith(b"foreign") else FakeTimingCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        self.calls.append(("set_timing_cache", ignore_mismatch))
        self.cache = cache
        return True

    def get_timing_cache(self) -> FakeTimingCache:
        return self.cache


class FakeBuilder:
    def __init__(self, trt, logger):
        self.trt = trt
        trt.log.append(("Builder",))

    def create_network(self, flags: int) -> FakeNetwork:
        self.trt.log.append(("create_network", flags))
        return FakeNetwork(flags)

    def create_builder_config(self) -> FakeConfig:
        config = FakeConfig(self.trt)
        self.trt.configs.append(config)
        return config

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()

    def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> bytes:
        plan = {
            "io": network.io,
            "profiles": [p.shapes for p in config.profiles],
            "flags": network.flags,
            "source": network.source,
        }
        self.trt.log.append(("build_serialized_network", Path(network.source).name))
        return json.dumps(plan).encode()


class FakeEngine:
    def __init__(self, trt, plan: dict):
        self.trt = trt
        self.io = [(t["name"], t, is_input) for t, is_input in plan["io"]]
        self.profiles = plan["profiles"]
        self.step = Path(plan["source"]).stem
        self.by_name = {name: (t, is_input) for name, t, is_input in self.io}

    @property
    def num_io_tensors(self) -> int:
        return len(self.io)

    def get_tensor_name(self, i: int) -> str:
        return self.io[i][0]

    def get_tensor_mode(self, name: str):
        return self.trt.TensorIOMode.INPUT if self.by_name[name][1] else self.trt.TensorIOMode.OUTPUT

    def is_shape_inference_io(self, name: str) -> bool:
        return name in self.trt.shape_tensors

    def get_tensor_dtype(self, name: str):
        dtype = self.by_name[name][0]["dtype"]
        return getattr(self.trt.DataType, {"float32": "FLOAT", "float16": "HALF", "int32": "INT32"}[dtype])

    def create_execution_context(self, strategy=None) -> FakeContext:
        ctx = FakeContext(self)
        ctx.strategy = strategy
        return ctx


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine = engine
        self.profile = None
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.calls = {"set_input_shape": 0, "set_tensor_address": 0, "execute_async_v3": 0}

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profile = index
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        self.calls["set_input_shape"] += 1
        lo, _, hi = self.engine.profiles[self.profile][name]
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
            return False  # TensorRT rejects a shape outside the active profile
        self.shapes[name] = tuple(shape)
        return True

    def _sizes(self) -> dict[str, int]:
        sizes = {}
        for name, t, is_input in self.engine.io:
            if is_input:
                for d, n in zip(t["shape"], self.shapes[name], strict=True):
                    if isinstance(d, str):
                        sizes[d] = n
        return sizes

    def get_tensor_shape(self, name: str) -> tuple:
        t, is_input = self.engine.by_name[name]
        if is_input:
            return self.shapes[name]
        sizes = self._sizes()
        return tuple(sizes[d] if isinstance(d, str) else d for d in t["shape"])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.calls["set_tensor_address"] += 1
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        """Run the executor on the memory at the bound addresses. An input whose address is also
        an output's is handed over as that memory itself (the graph updates it in place, like
        TensorScatter into an aliased buffer); any other input is read-only, so it is copied. Each
        output is then written at its address, unless it already is the memory there."""
        self.calls["execute_async_v3"] += 1
        out_addresses = {self.addresses[name] for name, _, is_input in self.engine.io if not is_input}
        feeds = {}
        for name, t, is_input in self.engine.io:
            if is_input:
                x = tensor_at(self.addresses[name], self.shapes[name], TORCH_DTYPES[t["dtype"]])
                feeds[name] = x if self.addresses[name] in out_addresses else x.clone()
        outputs = self.engine.trt.executor(self.engine.step, feeds)
        for name, t, is_input in self.engine.io:
            if not is_input:
                y = outputs[name]
                dst = tensor_at(self.addresses[name], self.get_tensor_shape(name), TORCH_DTYPES[t["dtype"]])
                if y.data_ptr() != dst.data_ptr() or y.shape != dst.shape or y.stride() != dst.stride():
                    dst.copy_(y)
        self.engine.trt.executed.append((self.engine.step, self.profile))
        return True


class FakeRuntime:
    def __init__(self, trt, logger):
        self.trt = trt

    def deserialize_cuda_engine(self, data: bytes) -> FakeEngine:
        self.trt.log.append(("deserialize_cuda_engine",))
        return FakeEngine(self.trt, json.loads(bytes(data)))


def make_fake_trt(flavor: str = "10", version: str = "10.99.0", parse_fails: bool = False) -> types.ModuleType:
    """A fresh fake `tensorrt` module (`flavor` "10": STRONGLY_TYPED and the precision flags
    exist; "11": neither does, as in TensorRT 11's removed-API table)."""
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # importlib.util.find_spec works
    trt.__version__ = version
    trt.log, trt.configs, trt.executed = [], [], []
    trt.executor = None  # (step, feeds) -> outputs, set by a test that executes
    trt.shape_tensors = set()  # input names the fake engines report as shape tensors

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    trt.Logger = Logger
    if flavor == "10":
        trt.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", "STRONGLY_TYPED")
        trt.BuilderFlag = _enum("BuilderFlag", "FP16", "BF16", "INT8", "TF32")
    else:
        trt.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", "PREFER_AOT_PYTHON_PLUGINS")
        trt.BuilderFlag = _enum("BuilderFlag", "TF32")
    trt.MemoryPoolType = _enum("MemoryPoolType", "WORKSPACE")
    trt.TensorIOMode = _enum("TensorIOMode", "NONE", "INPUT", "OUTPUT")
    trt.DataType = _enum("DataType", "FLOAT", "HALF", "INT8", "INT32", "BOOL", "BF16", "INT64")
    trt.ExecutionContextAllocationStrategy = _enum(
        "ExecutionContextAllocationStrategy", "STATIC", "ON_PROFILE_CHANGE", "USER_MANAGED"
    )
    trt.Builder = lambda logger: FakeBuilder(trt, logger)
    trt.OnnxParser = lambda network, logger: FakeParser(network, logger, fail=parse_fails)
    trt.Runtime = lambda logger: FakeRuntime(trt, logger)
    return trt
