"""The `trt` backend: TensorRT engines built by `fastblt build` from the export's ONNX graphs.

Per step graph: one engine, one execution context per optimization profile (a call runs on the
smallest profile containing its sizes), and device buffers that are torch CUDA tensors,
allocated once and overwritten in place. Every step runs on one CUDA stream:

    feeds on the device (bound in place) --execute_async_v3--> device outputs
    other feeds --copy--> device input buffers --^

The runtime's SequenceState keeps its caches on `backend.device`, so they are bound by address,
never copied; only a step's small feeds (ids, positions) cross from the host. A cache output
aliased to its input (`StepSpec.aliases`: present.* is past.*) is bound at that input's address,
so the engine writes the new entries into the caller's cache in place, and the output returned
is the caller's tensor (such a cache must be contiguous on the device: InternalError otherwise,
before anything is bound). Other outputs are device tensors owned by the backend (valid until
the next call of the same step); the stream is synchronized before they are returned, and
waits for the caller's stream before it reads the feeds.

Loading is guarded: each engine's manifest is checked against the export manifest (ONNX sha256),
the running TensorRT version and this GPU before its plan is deserialized (engine_cache.py).

TensorRT calls (TensorRT 10/11 Python API, IExecutionContext / ICudaEngine reference pages;
the same calls polygraphy 0.53.6 backend/trt/runner.py makes, and NVIDIA/TensorRT
samples/python/common_runtime.py): `engine.num_io_tensors`, `get_tensor_name`,
`get_tensor_mode`, `get_tensor_dtype`, `is_shape_inference_io`,
`engine.create_execution_context(ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE)`,
`context.set_optimization_profile_async(i, stream)`, `context.set_input_shape(name, shape)`,
`context.get_tensor_shape(name)`, `context.set_tensor_address(name, ptr)`,
`context.execute_async_v3(stream_handle)`. Never run here: no GPU and no TensorRT on this
machine or in CI; scripts/gpu_check.sh runs it where both exist.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fastblt.engines.base import Backend, resolve_device
from fastblt.engines.trt.build import EngineFromPath, current_machine, require_tensorrt
from fastblt.engines.trt.engine_cache import ENGINES_DIR, rebuild_hint
from fastblt.engines.trt.profiles import Profile, named_sizes, select_profile
from fastblt.errors import InputError, InternalError, ManifestMismatch
from fastblt.export.spec import TORCH_DTYPES, StepSpec, TensorSpec
from fastblt.formats.files import utf8_path

# TensorRT DataType member name -> the spec's dtype name
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64"}


def resolved_shape(t: TensorSpec, sizes: Mapping[str, int]) -> tuple[int, ...]:
    """A spec shape with its named dims replaced by this call's sizes."""
    return tuple(sizes[d] if isinstance(d, str) else d for d in t.shape)


class Buffers:
    """Named reusable buffers on one device: a view of the requested shape over storage that is
    allocated once and only replaced when a larger shape is asked for (`grown` counts that)."""

    def __init__(self, device: torch.device | str, pin: bool = False):
        self.device = torch.device(device)
        self.pin = pin
        self._store: dict[str, torch.Tensor] = {}
        self.grown = 0

    def view(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._store.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = torch.empty(max(n, 1), dtype=dtype, device=self.device, pin_memory=self.pin)
            self._store[name] = buf
            self.grown += 1
        return buf[:n].view(tuple(shape))

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._store.values())


def check_engine_io(engine: Any, spec: StepSpec, trt: Any) -> None:
    """The engine's I/O tensors are the spec's: names, direction and dtype (ManifestMismatch)."""
    io = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        io[name] = (is_input, TRT_DTYPES.get(engine.get_tensor_dtype(name).name, engine.get_tensor_dtype(name).name))
        # a shape tensor's values must live in host memory; fastblt's graphs use every input as data
        if is_input and engine.is_shape_inference_io(name):
            raise ManifestMismatch(
                f"engine {spec.name} | input {name}: TensorRT made it a shape tensor (its values set shapes); "
                "the step graphs must use it only as data (re-export the graph)"
            )
    want = {t.name: (True, t.dtype) for t in spec.inputs} | {t.name: (False, t.dtype) for t in spec.outputs}
    if sorted(io) != sorted(want):
        raise ManifestMismatch(f"engine {spec.name}: I/O tensors {sorted(io)}, the spec has {sorted(want)}")
    for name, (is_input, dtype) in want.items():
        if io[name] != (is_input, dtype):
            got_dir, got_dtype = io[name]
            raise ManifestMismatch(
                f"engine {spec.name} | tensor {name}: {'input' if got_dir else 'output'} {got_dtype}, "
                f"expected {'input' if is_input else 'output'} {dtype}"
            )


class StepRunner:
    """One step graph on one engine: a context per profile, device and host buffers, binding.

    `stream` is the CUDA stream handle execute_async_v3 gets, `on_stream` a context manager that
    makes torch's copies run on that stream, `sync` waits for it.
    """

    def __init__(
        self,
        spec: StepSpec,
        engine: Any,
        profiles: Sequence[Profile],
        device: torch.device | str,
        stream: int,
        on_stream: Callable[[], contextlib.AbstractContextManager],
        sync: Callable[[], None],
        allocation: Any = None,
    ):
        self.spec, self.engine, self.profiles = spec, engine, list(profiles)
        self.aliases = dict(spec.aliases)  # output -> input: a cache the engine writes in place
        self.stream, self.on_stream, self.sync = stream, on_stream, sync
        self.contexts = []
        for i in range(len(self.profiles)):
            # ON_PROFILE_CHANGE: a context holds activation memory for its own profile only,
            # not for the largest one (STATIC, the default) -- one context per profile.
            ctx = (
                engine.create_execution_context() if allocation is None else engine.create_execution_context(allocation)
            )
            if ctx is None:
                raise InternalError(f"engine {spec.name}: create_execution_context returned None (out of memory?)")
            if not ctx.set_optimization_profile_async(i, stream):
                raise InternalError(f"engine {spec.name}: could not select optimization profile {i}")
            self.contexts.append(ctx)
        self.sync()
        # per context: the shape and address last bound to each tensor (bind only what changed)
        self.bound: list[dict[str, tuple]] = [{} for _ in self.contexts]
        self.device_buffers = Buffers(device)
        self._preallocate()

    def _preallocate(self) -> None:
        """Output buffers for the largest profile's `opt` sizes; larger calls grow them (rarely).
        Input buffers are allocated on first use: feeds already on the device need none."""
        p = max(self.profiles, key=Profile.volume)
        sizes = {d: r.opt for d, r in p.dims.items()}
        for t in self.spec.outputs:
            if t.name not in self.aliases:
                self.device_buffers.view(t.name, resolved_shape(t, sizes), TORCH_DTYPES[t.dtype])

    def _input_address(self, name: str, x: torch.Tensor) -> int:
        """A feed on this device is bound where it is; anything else is copied to a buffer."""
        if x.device == self.device_buffers.device and x.is_contiguous():
            return x.data_ptr()
        dev = self.device_buffers.view(name, x.shape, x.dtype)
        dev.copy_(x, non_blocking=True)
        return dev.data_ptr()

    def _bind(self, i: int, name: str, shape: tuple[int, ...] | None, ptr: int) -> bool:
        """Set an input's shape (shape not None) and a tensor's address on context i when they
        changed; returns whether a shape changed."""
        ctx, last = self.contexts[i], self.bound[i]
        prev_shape, prev_ptr = last.get(name, (None, None))
        changed = False
        if shape is not None and shape != prev_shape:
            if not ctx.set_input_shape(name, shape):
                raise InputError(f"step {self.spec.name} | input {name}: TensorRT rejected shape {shape}")
            changed = True
        if ptr != prev_ptr and not ctx.set_tensor_address(name, ptr):
            raise InternalError(f"step {self.spec.name} | tensor {name}: set_tensor_address failed")
        last[name] = (shape, ptr)
        return changed

    def _check_aliased(self, feeds: Mapping[str, torch.Tensor]) -> None:
        """Every cache the engine writes in place is contiguous on this device (InternalError if
        not): it is bound where it is, since a copy would take the write away from the caller."""
        dev = self.device_buffers.device
        for name in self.aliases.values():
            x = feeds[name]
            if x.device != dev or not x.is_contiguous():
                got = f"a tensor on {x.device}" if x.device != dev else f"a non-contiguous one (strides {x.stride()})"
                raise InternalError(
                    f"step {self.spec.name} | input {name}: a cache written in place must be contiguous on {dev}, "
                    f"got {got}"
                )

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Feeds (host or device tensors, spec dtypes) -> device outputs (valid until the next run)."""
        spec = self.spec
        sizes = named_sizes(spec.name, spec.inputs, {t.name: feeds[t.name].shape for t in spec.inputs})
        i = select_profile(spec.name, self.profiles, sizes)
        self._check_aliased(feeds)  # before any binding: such a cache must never be copied to a buffer
        ctx = self.contexts[i]
        outputs = {}
        with self.on_stream():
            reshaped = False
            for t in spec.inputs:
                x = feeds[t.name]
                reshaped |= self._bind(i, t.name, tuple(x.shape), self._input_address(t.name, x))
            for t in spec.outputs:
                if t.name in self.aliases:  # the output is the input's own memory
                    x = feeds[self.aliases[t.name]]
                    self._bind(i, t.name, None, x.data_ptr())
                    outputs[t.name] = x
                    continue
                shape = resolved_shape(t, sizes)
                if reshaped and tuple(ctx.get_tensor_shape(t.name)) != shape:
                    raise InternalError(
                        f"step {spec.name} | output {t.name}: engine shape {tuple(ctx.get_tensor_shape(t.name))}, "
                        f"spec gives {shape}"
                    )
                dev = self.device_buffers.view(t.name, shape, TORCH_DTYPES[t.dtype])
                self._bind(i, t.name, None, dev.data_ptr())
                outputs[t.name] = dev
            if not ctx.execute_async_v3(self.stream):
                raise InternalError(f"step {spec.name}: execute_async_v3 failed (see the TensorRT log)")
        self.sync()  # the caller may read the outputs on any stream, or copy them to the host
        return outputs


class TrtBackend(Backend):
    """TensorRT engines from `fastblt build`, on one CUDA device and stream.

    Args:
        specs: the step specs (must equal the export manifest's graphs).
        artifacts_dir: the export directory (manifest.json and the ONNX files).
        engines_dir: where `fastblt build` wrote the engines (default ARTIFACTS/engines).
        device: a CUDA device ("cuda", "cuda:1").
        threads: accepted for interface parity with the CPU backends; TensorRT has no such knob.
    """

    name = "trt"

    def __init__(
        self,
        specs: dict[str, StepSpec],
        artifacts_dir: str | Path,
        engines_dir: str | Path | None = None,
        device: str = "cuda",
        threads: int | None = None,
    ):
        super().__init__(specs)
        self.artifacts_dir = utf8_path(artifacts_dir, "artifacts")
        self.engines_dir = Path(engines_dir) if engines_dir is not None else self.artifacts_dir / ENGINES_DIR
        self.device = torch.device(device)
        del threads
        self.runners: dict[str, StepRunner] = {}
        self.manifests: dict[str, Any] = {}

    def _activate_impl(self) -> None:
        from fastblt.export.manifest import read_manifest, verify_specs

        trt = require_tensorrt()  # BackendUnavailable with the reason when there is no TRT / CUDA
        self.device = resolve_device(self.device)  # "cuda" -> "cuda:N": feeds there are bound in place
        export = read_manifest(self.artifacts_dir)
        verify_specs(export, self.specs, str(self.artifacts_dir / "manifest.json"))
        stream, on_stream, sync = _cuda_stream(self.device)
        machine = current_machine(self.device)
        hint = rebuild_hint(self.artifacts_dir, self.engines_dir)
        strategies = getattr(trt, "ExecutionContextAllocationStrategy", None)  # TensorRT >= 10
        allocation = getattr(strategies, "ON_PROFILE_CHANGE", None)
        runners = {}
        with on_stream():  # also makes self.device current: TensorRT loads onto the current device
            for step, spec in self.specs.items():
                engine, manifest = EngineFromPath(self.engines_dir, step, export["graphs"][step], machine, hint)()
                check_engine_io(engine, spec, trt)
                profiles = [Profile.from_dict(p) for p in manifest.profiles]
                runners[step] = StepRunner(spec, engine, profiles, self.device, stream, on_stream, sync, allocation)
                self.manifests[step] = manifest
        self.runners = runners
        # every step must take a batch's rows: the smallest of the steps' largest profile batch
        self.max_rows = min(max(p.dims["batch"].max for p in r.profiles) for r in runners.values())

    def _run_step_impl(self, step: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.runners[step].run(feeds)

    def _deactivate_impl(self) -> None:
        for r in self.runners.values():
            r.sync()
        self.runners = {}


def _cuda_stream(device: torch.device) -> tuple[int, Callable[[], contextlib.AbstractContextManager], Callable]:
    """(handle, on_stream, sync) of one new CUDA stream on `device` (tests replace this)."""
    if device.type != "cuda":
        raise InputError(f"backend trt: device {device} is not a CUDA device")
    s = torch.cuda.Stream(device=device)

    @contextlib.contextmanager
    def on_stream() -> Iterator[None]:
        s.wait_stream(torch.cuda.current_stream(device))  # the caller's writes to the feeds come first
        with torch.cuda.stream(s):
            yield

    return s.cuda_stream, on_stream, s.synchronize
