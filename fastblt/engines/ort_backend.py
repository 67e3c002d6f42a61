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

import functools
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fastblt.engines.base import Availability, Backend
from fastblt.errors import BackendUnavailable, InternalError, ManifestMismatch
from fastblt.export.manifest import MANIFEST, read_manifest, verify_files, verify_specs
from fastblt.export.spec import TORCH_DTYPES, StepSpec
from fastblt.formats.files import utf8_path
from fastblt.machine import cpu_cores

# onnx.TensorProto element types (ORT's bind_* accept them as ints; numpy has no bfloat16)
_ELEM = {"int32": 6, "float32": 1, "float16": 10, "bfloat16": 16}
_MAX_SHAPES_PER_STEP = 32  # output buffer sets kept per step (LRU): prefill sizes vary, decode repeats
_TINY = 5e-324  # the smallest positive double, a denormal
_SEEN_PER_INPUT = 8  # tensor objects remembered per input (the runner feeds one view per shape)
WIDE = "global (wide)"  # the key of widen_global's session


class OrtBackend(Backend):
    """onnxruntime over `artifacts_dir` (a `fastblt export` directory) for the given specs.

    Args:
        specs: the step specs the caller will feed (export/spec.py `step_specs(config, max_step, dtype)`).
        artifacts_dir: directory with manifest.json and the .onnx files.
        threads: intra-op threads per session. None: one for the per-byte steps (their matrices are
            too small to split across cores: the hand-off costs more) and every core this process
            may use for the global step, whose weights are most of the model
            (benchmarks/results/runtime_bench.md measures both). Workers spin only inside a call.
        providers: onnxruntime execution providers (None: CUDA then CPU when CUDA is available,
            else CPU).
        verify_hashes: check every graph file's sha256 against the manifest (on by default).
    """

    name = "ort"
    concurrent_steps = True  # one session and one IO binding per step

    def __init__(
        self,
        specs: dict[str, StepSpec],
        artifacts_dir: str | Path,
        threads: int | None = None,
        providers: list[str] | None = None,
        verify_hashes: bool = True,
    ):
        super().__init__(specs)
        self.artifacts_dir = utf8_path(Path(artifacts_dir).expanduser(), "artifacts")
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
        self._seen: dict[str, list] = {}
        self._runs: dict[str, Callable[[], None]] = {}
        self._last: dict[str, list] = {}
        self._own: dict[str, dict[str, torch.Tensor]] = {}  # the own outputs bound now, per step
        self._outputs: dict[str, OrderedDict] = {step: OrderedDict() for step in specs}
        self._plans = {step: _plan(spec) for step, spec in specs.items()}
        self._wide: tuple[int, Callable[[], bool]] | None = None  # widen_global's threads and test
        self._global_threads = threads if threads is not None else _all_cores()
        self.device = torch.device("cpu")
        self._sync = False

    @property
    def graph_bytes(self) -> int:
        """Bytes of the graph files this backend runs (their weights, mostly): a process holds them
        once more in its sessions."""
        graphs = self.manifest["graphs"]
        return sum((self.artifacts_dir / graphs[step]["file"]).stat().st_size for step in self.specs)

    def set_global_threads(self, threads: int) -> None:
        """Run the global step on `threads` intra-op threads (0: onnxruntime's default, every core),
        the per-byte steps as they are: a batch lane sharing the machine takes its share of the
        cores for the global step, whose matrices are the ones worth splitting."""
        if threads != self._global_threads:
            self._global_threads = threads
            if self.active:
                self._open("global", self.specs["global"], threads)

    def widen_global(self, threads: int, when: Callable[[], bool]) -> None:
        """Keep a second global-step session on `threads` intra-op threads (0: every core) and run
        the global step there whenever `when()` says so. A batch lane whose cores are shared with
        other lanes runs its global step on one thread (two lanes' wide calls at once fight over
        the cores: 16 streams 25% slower); `when` tells it the other lanes are idle, so a request
        alone gets the cores back. Both sessions compute the same bits (MLAS splits the work over
        rows and columns, not sums; tests/runtime/test_ort.py checks it)."""
        if "global" not in self.specs:
            raise InternalError("widen_global: this backend has no global step")
        self._wide = (threads, when)
        self._plans[WIDE] = self._plans["global"]
        self._outputs[WIDE] = OrderedDict()
        if self.active:
            self._open(WIDE, self.specs["global"], threads)

    # lifecycle --------------------------------------------------------------------------
    def _activate_impl(self) -> None:
        flushing = flushes_denormals()  # the first session of a process sets its creator thread's mode
        for step, spec in self.specs.items():
            per_byte = self.threads if self.threads is not None else 1
            self._open(step, spec, self._global_threads if spec.stack == "global" else per_byte)
        if self._wide is not None:
            self._open(WIDE, self.specs["global"], self._wide[0])
        if flushes_denormals() != flushing:  # not ours to keep: the caller's thread gets its own mode back
            torch.set_flush_denormal(flushing)
        on_cuda = "CUDAExecutionProvider" in next(iter(self._sessions.values())).get_providers()
        self.device = torch.device("cuda") if on_cuda and torch.cuda.is_available() else torch.device("cpu")
        self._sync = self.device.type == "cuda"  # read per call: a torch attribute read costs more there

    def _open(self, key: str, spec: StepSpec, threads: int) -> None:
        """The session (and IO binding) that runs `key`: a step, or the wide global session."""
        import onnxruntime as ort

        providers = self.providers or _default_providers()
        step = spec.name
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads  # 0: onnxruntime's default
        options.inter_op_num_threads = 1
        # a session with workers (the global step) lets them spin inside a call, where each of
        # its ~200 nodes hands work to them and a sleeping worker takes tens of microseconds to
        # wake (1.3 ms -> 0.86 ms a call on 2 cores), and stops them when the call returns: the
        # host work between calls, torch's own threads and a batch's other lanes need those
        # cores (spinning between calls made blt-d 2x slower; docs/benchmarks.md)
        spin = "0" if threads == 1 else "1"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.force_spinning_stop", "1")
        # denormals flushed to zero: attention over a long context underflows, and each use of a
        # denormal costs a microcode assist (a 10 KB prompt committed 36% faster, the bytes
        # the same). This sets the session's workers; the calling thread flushes per call
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
        path = self.artifacts_dir / self.manifest["graphs"][step]["file"]
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:
            # a bf16 graph on the CPU build, which has no bfloat16 kernels: this machine, not the
            # export (a float32 graph onnxruntime cannot load is the export's fault: raised as it is)
            if "NOT_IMPLEMENTED" not in str(e) or not any(t.dtype == "bfloat16" for t in spec.inputs):
                raise
            first = " ".join(str(e).split())[:300]
            raise BackendUnavailable(f"backend ort: {path.name}: onnxruntime on this machine has no bfloat16 kernels "
                                     f"({first}); bf16 graphs run on a GPU (onnxruntime-gpu, trt): export with "
                                     "--dtype fp32 or fp16 for the CPU") from None  # fmt: skip
        got = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        want = ([t.name for t in spec.inputs], [t.name for t in spec.outputs])
        if got != want:
            raise ManifestMismatch(f"{path}: graph I/O names {got}, manifest/spec {want}")
        self._sessions[key] = session
        self._bindings[key] = binding = session.io_binding()
        self._runs[key] = _runner(session, binding)
        self._bound[key] = {}  # name -> (address, shape) last bound
        self._seen[key] = [{} for _ in spec.inputs]  # per input: tensors fed lately, by id (weakly)
        self._last[key] = [None] * len(spec.inputs)  # per input: the tensor the last call bound (weakly)
        self._own.pop(key, None)

    def _deactivate_impl(self) -> None:
        self._sessions.clear()
        self._runs.clear()
        self._bindings.clear()
        self._bound.clear()
        self._seen.clear()
        self._last.clear()
        self._own.clear()
        for buffers in self._outputs.values():
            buffers.clear()

    # the hot path -------------------------------------------------------------------------
    def _run_step_impl(self, step: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bind feeds by pointer (only what moved or changed shape), bind the outputs, run. Outputs
        are valid until the next call of `step` with the same output shapes (reused, not reallocated).

        A feed that is a tensor object fed lately (the caches, the runner's reused input views, one
        per shape) is not looked at again: the runtime never resizes a tensor it feeds, and a torch
        attribute read costs several microseconds on the caches a step call has just evicted. The
        backend remembers those objects by weak reference only: a cache the caller replaces (a
        growing global cache) is freed at once, not held until the next call. Unless an input
        changed a dimension an output's shape reads or a cache moved, the outputs of the previous
        call are bound already."""
        if step == "global" and self._wide is not None and self._wide[1]():
            step = WIDE
        plan, binding, bound, seen = self._plans[step], self._bindings[step], self._bound[step], self._seen[step]
        prev = self._last[step]
        keep = []  # contiguous copies must outlive the run
        rebind = False  # the outputs: an input's shape changed (new output shapes) or a cache moved
        for i, (name, elem, in_place, sizes) in enumerate(plan.inputs):
            x = feeds[name]
            ref = prev[i]
            if ref is not None and ref() is x:  # the previous call bound this very tensor
                continue
            prev[i] = None
            known = seen[i].get(id(x))
            if known is not None and known[0]() is x:
                where, device = known[1], known[2]
                prev[i] = known[0]
            else:
                if not x.is_contiguous():
                    if in_place:  # a copy would take the in-place write away from the caller
                        raise InternalError(f"step {step} | input {name}: a cache written in place must be contiguous")
                    x = x.contiguous()  # a fresh copy every call: not remembered
                    keep.append(x)
                where, device = (x.data_ptr(), x.shape), x.device
                if x is feeds[name]:
                    if len(seen[i]) >= _SEEN_PER_INPUT:
                        seen[i].clear()
                    ref = weakref.ref(x)
                    seen[i][id(x)] = (ref, where, device)
                    prev[i] = ref
            last = bound.get(name)
            if last != where:  # the caches and the caller's reused inputs keep their address
                binding.bind_input(name, device.type, device.index or 0, elem, tuple(where[1]), where[0])
                bound[name] = where
                # outputs are bound again when a cache moved or an output's shape changed (not for
                # a global step's longer patches: its latents' shape does not read patch_len)
                rebind = rebind or in_place or last is None or any(last[1][a] != where[1][a] for a in sizes)
        own = self._own.get(step)
        if rebind or own is None:
            own = self._bind_outputs(step, plan, binding, bound, feeds)
        outputs = dict(own)
        for name, _, source in plan.aliased:
            outputs[name] = feeds[source]
        if flushes_denormals():
            self._runs[step]()
        else:  # the calling thread flushes denormals for this call only
            torch.set_flush_denormal(True)
            try:
                self._runs[step]()
            finally:
                torch.set_flush_denormal(False)
        if self._sync:
            binding.synchronize_outputs()
        del keep
        return outputs

    def _bind_outputs(self, step: str, plan: _Plan, binding, bound: dict, feeds: dict[str, torch.Tensor]) -> dict:
        """Bind this call's outputs (own buffers for its shapes; caches to their inputs); the own ones."""
        shapes = tuple(tuple(d if type(d) is int else feeds[d[0]].shape[d[1]] for d in o[3]) for o in plan.own)
        own = self._own[step] = self._output_buffers(step, plan, shapes)
        dev = self.device
        targets = [(name, elem, (y.data_ptr(), y.shape)) for name, elem, y in ((n, e, own[n]) for n, e, *_ in plan.own)]
        # an aliased output is its cache input, whose address and shape were just bound (no torch calls)
        for name, elem, where in targets + [(name, elem, bound[source]) for name, elem, source in plan.aliased]:
            if bound.get(name) != where:
                binding.bind_output(name, dev.type, dev.index or 0, elem, tuple(where[1]), where[0])
                bound[name] = where
        return own

    def _output_buffers(self, step: str, plan: _Plan, shapes: tuple) -> dict[str, torch.Tensor]:
        """This call's own output tensors (not the aliased caches), reused per set of shapes."""
        cached = self._outputs[step]
        buffers = cached.get(shapes)
        if buffers is None:
            buffers = {
                name: torch.empty(shape, dtype=dtype, device=self.device)
                for (name, _, dtype, _), shape in zip(plan.own, shapes, strict=True)
            }
            cached[shapes] = buffers
            if len(cached) > _MAX_SHAPES_PER_STEP:
                cached.popitem(last=False)
        else:
            cached.move_to_end(shapes)
        return buffers


@dataclass(frozen=True)
class _Plan:
    """How one step is bound, worked out once from its spec (the hot path only reads it)."""

    # name, ONNX element type, written in place, the axes an own output's shape is read from
    inputs: tuple[tuple[str, int, bool, tuple[int, ...]], ...]
    own: tuple[tuple[str, int, torch.dtype, tuple], ...]  # name, element type, dtype, shape recipe
    aliased: tuple[tuple[str, int, str], ...]  # output name, element type, the input it is


def _plan(spec: StepSpec) -> _Plan:
    """Each output dim is static or read off a feed: (input name, axis) of its first named use."""
    where: dict[str, tuple[str, int]] = {}
    for t in spec.inputs:
        for axis, d in enumerate(t.shape):
            if isinstance(d, str):
                where.setdefault(d, (t.name, axis))
    aliases = dict(spec.aliases)
    sized = {where[d] for t in spec.outputs if t.name not in aliases for d in t.shape if isinstance(d, str)}
    inputs = tuple(
        (t.name, _ELEM[t.dtype], t.name in aliases.values(), tuple(a for n, a in sorted(sized) if n == t.name))
        for t in spec.inputs
    )
    own = tuple(
        (t.name, _ELEM[t.dtype], TORCH_DTYPES[t.dtype], tuple(d if isinstance(d, int) else where[d] for d in t.shape))
        for t in spec.outputs
        if t.name not in aliases
    )
    aliased = tuple((t.name, _ELEM[t.dtype], aliases[t.name]) for t in spec.outputs if t.name in aliases)
    return _Plan(inputs, own, aliased)


def flushes_denormals() -> bool:
    """Whether this thread's floating-point unit flushes denormals to zero: the smallest double
    times two is 0.0 then (a Python float multiply obeys the thread's mode, as every kernel does)."""
    return _TINY * 2.0 == 0.0


def _runner(session, binding) -> Callable[[], None]:
    """session.run_with_iobinding(binding) as one call. The public method first asks the session
    about WebGPU graph capture (several microseconds a call, for a feature a CPU or CUDA session
    never uses), so the call goes straight to the pybind session where the wrapper's attributes
    are there to reach it."""
    raw_session, raw_binding = getattr(session, "_sess", None), getattr(binding, "_iobinding", None)
    if raw_binding is None or not hasattr(raw_session, "run_with_iobinding"):
        return functools.partial(session.run_with_iobinding, binding)
    return functools.partial(raw_session.run_with_iobinding, raw_binding, None)


def _all_cores() -> int:
    """Intra-op threads for "every core": onnxruntime's own default (0) counts the host's cores,
    which a cpuset or a container's CPU quota may not lend this process; then the cores it may use."""
    cores = cpu_cores()
    return 0 if cores == os.cpu_count() else cores


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
