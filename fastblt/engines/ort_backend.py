"""The `ort` backend: onnxruntime sessions over an export directory, fed by IO binding.

One InferenceSession per step graph, created once at activation (CPU EP; CUDA EP first when
onnxruntime-gpu is installed). Every call binds the caller's torch tensors by data pointer
(zero-copy on the CPU). A cache output (`present.*`, aliased to its input in the spec) is bound to
that same input's memory, so the graph's TensorScatter writes the caller's cache in place; other
outputs go to torch tensors this backend preallocates per output shape. A step then neither copies
a cache nor allocates once its shapes have been seen.
The export's manifest is checked before anything runs: files and sha256, and the spec of every
graph against the `specs` the caller will feed (ManifestMismatch names the field that differs).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from fastblt.engines.base import Availability, Backend
from fastblt.errors import InternalError, ManifestMismatch
from fastblt.export.manifest import MANIFEST, read_manifest, verify_files, verify_specs
from fastblt.export.spec import TORCH_DTYPES, StepSpec

# onnx.TensorProto element types (ORT's bind_* accept them as ints; numpy has no bfloat16)
_ELEM = {"int32": 6, "float32": 1, "float16": 10, "bfloat16": 16}
_MAX_SHAPES_PER_STEP = 32  # output buffer sets kept per step (LRU): prefill sizes vary, decode repeats


class OrtBackend(Backend):
    """onnxruntime over `artifacts_dir` (a `fastblt export` directory) for the given specs.

    Args:
        specs: the step specs the caller will feed (export/spec.py `step_specs(config, C, P, dtype)`).
        artifacts_dir: directory with manifest.json and the .onnx files.
        threads: intra-op threads per session (None: onnxruntime's default, all cores).
        providers: onnxruntime execution providers (None: CUDA then CPU when CUDA is available,
            else CPU).
        verify_hashes: check every graph file's sha256 against the manifest (on by default).
    """

    name = "ort"

    def __init__(
        self,
        specs: dict[str, StepSpec],
        artifacts_dir: str | Path,
        threads: int | None = None,
        providers: list[str] | None = None,
        verify_hashes: bool = True,
    ):
        super().__init__(specs)
        self.artifacts_dir = Path(artifacts_dir).expanduser()
        self.threads = threads
        self.providers = providers
        self.manifest = read_manifest(self.artifacts_dir)
        where = str(self.artifacts_dir / MANIFEST)
        verify_specs(self.manifest, specs, where)
        if verify_hashes:
            verify_files(self.artifacts_dir, self.manifest, list(specs))
        else:
            for step in specs:
                path = self.artifacts_dir / self.manifest["graphs"][step]["file"]
                if not path.is_file():
                    raise ManifestMismatch(f"{path}: graph file of {step} is missing")
        self._sessions: dict = {}
        self._bindings: dict = {}
        self._bound: dict[str, dict[str, tuple]] = {}
        self._outputs: dict[str, OrderedDict] = {step: OrderedDict() for step in specs}
        self._aliases = {step: dict(spec.aliases) for step, spec in specs.items()}
        self._aliased_inputs = {step: set(a.values()) for step, a in self._aliases.items()}
        self.device = torch.device("cpu")

    # lifecycle --------------------------------------------------------------------------
    def _activate_impl(self) -> None:
        import onnxruntime as ort

        providers = self.providers or _default_providers()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        for step, spec in self.specs.items():
            path = self.artifacts_dir / self.manifest["graphs"][step]["file"]
            session = ort.InferenceSession(str(path), options, providers=providers)
            got = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
            want = ([t.name for t in spec.inputs], [t.name for t in spec.outputs])
            if got != want:
                raise ManifestMismatch(f"{path}: graph I/O names {got}, manifest/spec {want}")
            self._sessions[step] = session
            self._bindings[step] = session.io_binding()
            self._bound[step] = {}  # name -> (device, shape, address) last bound
        on_cuda = "CUDAExecutionProvider" in next(iter(self._sessions.values())).get_providers()
        self.device = torch.device("cuda") if on_cuda and torch.cuda.is_available() else torch.device("cpu")

    def _deactivate_impl(self) -> None:
        self._sessions.clear()
        self._bindings.clear()
        self._bound.clear()
        for buffers in self._outputs.values():
            buffers.clear()

    # the hot path -------------------------------------------------------------------------
    def _run_step_impl(self, step: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bind feeds by pointer, bind preallocated outputs, run. Outputs are valid until the next
        call of `step` with the same output shapes (they are reused, not reallocated)."""
        spec = self.specs[step]
        binding, bound = self._bindings[step], self._bound[step]
        dims: dict[str, int] = {}
        keep = []  # contiguous copies must outlive the run
        aliased = self._aliased_inputs[step]
        for t in spec.inputs:
            x = feeds[t.name]
            if not x.is_contiguous():
                if t.name in aliased:  # a copy would take the in-place write away from the caller
                    raise InternalError(f"step {step} | input {t.name}: a cache written in place must be contiguous")
                x = x.contiguous()
                keep.append(x)
            for want, got in zip(t.shape, x.shape, strict=True):
                if isinstance(want, str):
                    dims.setdefault(want, got)
            where = (x.device, tuple(x.shape), x.data_ptr())
            if bound.get(t.name) != where:  # the static caches keep their address: bound once
                binding.bind_input(t.name, x.device.type, x.device.index or 0, _ELEM[t.dtype], where[1], where[2])
                bound[t.name] = where
        outputs = dict(self._output_buffers(step, spec, dims))
        dev = self.device
        for t in spec.outputs:
            alias = self._aliases[step].get(t.name)
            y = outputs[t.name] = feeds[alias] if alias is not None else outputs[t.name]
            where = (dev, tuple(y.shape), y.data_ptr())
            if bound.get(t.name) != where:
                binding.bind_output(t.name, dev.type, dev.index or 0, _ELEM[t.dtype], where[1], where[2])
                bound[t.name] = where
        self._sessions[step].run_with_iobinding(binding)
        if dev.type == "cuda":
            binding.synchronize_outputs()
        del keep
        return outputs

    def _output_buffers(self, step: str, spec: StepSpec, dims: dict[str, int]) -> dict[str, torch.Tensor]:
        """This call's own output tensors (not the aliased caches), reused per set of shapes."""
        own = [t for t in spec.outputs if t.name not in self._aliases[step]]
        shapes = tuple(tuple(dims[d] if isinstance(d, str) else d for d in t.shape) for t in own)
        cached = self._outputs[step]
        buffers = cached.get(shapes)
        if buffers is None:
            buffers = {
                t.name: torch.empty(shape, dtype=TORCH_DTYPES[t.dtype], device=self.device)
                for t, shape in zip(own, shapes, strict=True)
            }
            cached[shapes] = buffers
            if len(cached) > _MAX_SHAPES_PER_STEP:
                cached.popitem(last=False)
        else:
            cached.move_to_end(shapes)
        return buffers


def _default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def availability() -> Availability:
    try:
        import onnxruntime as ort
    except ImportError as e:
        return Availability("ort", False, f"onnxruntime is not installed ({e})")
    return Availability("ort", True, f"onnxruntime {ort.__version__} ({', '.join(_default_providers())})")
