"""TensorRT engine building and loading, as small single-purpose loaders (STYLE rule 8):

    NetworkFromOnnxPath(path)                     -> (builder, network, parser)
    EngineBytesFromNetwork(network, profiles, ..) -> serialized plan (bytes)
    SaveEngine(plan, engines_dir, manifest)       -> writes {step}.plan + {step}.engine.json
    EngineFromPath(engines_dir, step, graph, ..)  -> ICudaEngine, only through its manifest

`build_engines` chains them for every graph of an export. `tensorrt` is imported inside
functions only: this module imports (and its pure parts are tested) without TensorRT.

Written against the TensorRT 10 and 11 Python API (never run here: no GPU, no TensorRT):
- networks are strongly typed, precision comes from the ONNX graph. TensorRT 10 needs
  `1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)` for `create_network`; TensorRT 11
  is always strongly typed and keeps the flag only as an ignored, deprecated member, so the flag
  is passed only when the enum has it (TensorRT Python API, Core/Builder "NetworkDefinitionCreationFlag",
  10.x and 11.0.0 pages on docs.nvidia.com).
- no builder precision flags: `BuilderFlag.FP16/BF16/INT8/...` are removed in TensorRT 11
  ("Removed Python APIs and Replacements", TensorRT 10.x-to-11.x migration guide). TF32 is on by
  default and is cleared when `BuilderFlag.TF32` exists, so fp32 engines compute in fp32
  (deploy_notes.md §1.8, §2.8).
- `trt.OnnxParser(network, logger).parse_from_file(path)` keeps the ONNX file's directory for
  external data (polygraphy 0.53.6 backend/trt/loader.py NetworkFromOnnxPath; deploy_notes §2.7).
- `config.set_memory_pool_limit(MemoryPoolType.WORKSPACE, n)`, `builder.create_optimization_profile()`,
  `profile.set_shape(name, min, opt, max)`, `config.add_optimization_profile(profile)`,
  `config.create_timing_cache(bytes)`, `config.set_timing_cache(cache, ignore_mismatch=False)`,
  `config.get_timing_cache().serialize()`, `builder.build_serialized_network(network, config)`,
  `trt.Runtime(logger).deserialize_cuda_engine(plan)` (TensorRT Python API reference; the same
  calls polygraphy 0.53.6 backend/trt/config.py and loader.py make).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastblt.engines.base import Availability
from fastblt.engines.trt.engine_cache import (
    ENGINES_DIR,
    EngineManifest,
    Machine,
    check_engine,
    engine_cache_key,
    plan_path,
    sha256_bytes,
    up_to_date,
    write_engine,
)
from fastblt.engines.trt.profiles import Profile, graph_inputs, manifest_profiles
from fastblt.errors import BackendUnavailable, FastBltError, InputError, ManifestMismatch
from fastblt.export.spec import TensorSpec

NOT_INSTALLED = (
    "tensorrt is not installed (its libraries come from NVIDIA's package index: "
    "pip install tensorrt --extra-index-url https://pypi.nvidia.com)"
)
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"
DEFAULT_WORKSPACE_GB = 4.0


class EngineBuildError(FastBltError):
    """TensorRT could not parse a graph or build an engine (the message carries its errors)."""


# ------------------------------------------------------------------------------ environment
def _import_tensorrt() -> Any:
    """`import tensorrt`, or BackendUnavailable saying what is missing."""
    try:
        import tensorrt
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] != "tensorrt":
            raise BackendUnavailable(f"tensorrt cannot be imported: {e}") from None
        raise BackendUnavailable(NOT_INSTALLED) from None
    except (ImportError, OSError) as e:  # e.g. the bindings wheel without libnvinfer.so
        raise BackendUnavailable(f"tensorrt cannot be imported: {e}") from None
    return tensorrt


def trt_availability() -> Availability:
    """Whether the trt backend can run here, with the reason (no GPU work, no engine build)."""
    try:
        trt = _import_tensorrt()
    except BackendUnavailable as e:
        return Availability("trt", False, str(e))
    import torch

    if not torch.cuda.is_available():
        return Availability("trt", False, NO_CUDA)
    cc = ".".join(map(str, torch.cuda.get_device_capability()))
    return Availability("trt", True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name()} (sm {cc})")


def require_tensorrt() -> Any:
    """The tensorrt module when TensorRT and a CUDA device are here; BackendUnavailable if not."""
    status = trt_availability()
    if not status.available:
        raise BackendUnavailable(f"backend trt: unavailable here: {status.reason}")
    return _import_tensorrt()


def current_machine(device: Any = None) -> Machine:
    """The running TensorRT version and the GPU `device` (default: the current CUDA device)."""
    import torch

    trt = require_tensorrt()
    device = torch.cuda.current_device() if device is None else device
    major, minor = torch.cuda.get_device_capability(device)
    return Machine(trt.__version__, torch.cuda.get_device_name(device), f"{major}.{minor}")


_LOGGERS: dict[int, Any] = {}


def trt_logger(trt: Any) -> Any:
    """One trt.Logger(WARNING) per tensorrt module (TensorRT wants a single logger per process)."""
    if id(trt) not in _LOGGERS:
        _LOGGERS[id(trt)] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[id(trt)]


_RUNTIMES: dict[int, Any] = {}


def trt_runtime(trt: Any) -> Any:
    """One trt.Runtime per process, kept alive as long as the engines it deserialized."""
    if id(trt) not in _RUNTIMES:
        _RUNTIMES[id(trt)] = trt.Runtime(trt_logger(trt))
    return _RUNTIMES[id(trt)]


def network_flags(trt: Any) -> int:
    """`create_network` flags: STRONGLY_TYPED where the enum has it (TRT 10), else 0 (TRT 11:
    always strongly typed)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_flags(workspace_bytes: int, opt_level: int | None = None) -> dict[str, Any]:
    """What the builder is configured with (recorded in the manifest and in the cache key).
    opt_level: `config.builder_optimization_level` (0-5; None: TensorRT's default, 3)."""
    return {
        "strongly_typed": True,
        "tf32": False,
        "precision_flags": [],
        "workspace_bytes": int(workspace_bytes),
        "builder_optimization_level": opt_level,
    }


# ------------------------------------------------------------------------------ loaders
class NetworkFromOnnxPath:
    """() -> (builder, network, parser): a strongly typed network parsed from an ONNX file."""

    def __init__(self, path: Path | str, expected_inputs: Sequence[str] | None = None):
        self.path = Path(path)
        self.expected_inputs = expected_inputs

    def __call__(self) -> tuple[Any, Any, Any]:
        trt = _import_tensorrt()
        logger = trt_logger(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(self.path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(f"{self.path}: the TensorRT ONNX parser failed: {errors or 'no error recorded'}")
        names = [network.get_input(i).name for i in range(network.num_inputs)]
        if self.expected_inputs is not None and names != list(self.expected_inputs):
            raise EngineBuildError(f"{self.path}: parsed network inputs {names}, manifest has {self.expected_inputs}")
        return builder, network, parser


class EngineBytesFromNetwork:
    """() -> plan bytes: one optimization profile per `profiles` entry (profile i = index i),
    a workspace limit, TF32 cleared, no precision flags, the builder optimization level when
    given, and the timing cache read from and written back to `timing_cache` (None: a fresh
    cache, not saved)."""

    def __init__(
        self,
        network: Callable[[], tuple[Any, Any, Any]],
        inputs: Sequence[TensorSpec],
        profiles: Sequence[Profile],
        workspace_bytes: int,
        timing_cache: Path | None = None,
        opt_level: int | None = None,
    ):
        self.network = network
        self.inputs = inputs
        self.profiles = profiles
        self.workspace_bytes = workspace_bytes
        self.timing_cache = None if timing_cache is None else Path(timing_cache)
        self.opt_level = opt_level

    def __call__(self) -> bytes:
        trt = _import_tensorrt()
        builder, network, _parser = self.network()
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        tf32 = getattr(trt.BuilderFlag, "TF32", None)
        if tf32 is not None:
            config.clear_flag(tf32)
        if self.opt_level is not None:
            config.builder_optimization_level = self.opt_level
        dynamic = [t for t in self.inputs if any(isinstance(d, str) for d in t.shape)]
        for p in self.profiles:
            profile = builder.create_optimization_profile()
            for t in dynamic:
                profile.set_shape(t.name, *p.shapes(t))
            config.add_optimization_profile(profile)
        cache = self._timing_cache(config)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineBuildError("TensorRT build_serialized_network returned None (see the TensorRT log above)")
        if self.timing_cache is not None:
            _write_atomic(self.timing_cache, bytes(cache.serialize()))
        return bytes(plan)

    def _timing_cache(self, config: Any) -> Any:
        data = self.timing_cache.read_bytes() if self.timing_cache and self.timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise EngineBuildError(
                f"timing cache {self.timing_cache}: TensorRT refused it (written by another TensorRT version "
                "or GPU?); delete it or pass another --timing-cache"
            )
        return config.get_timing_cache()


class SaveEngine:
    """() -> EngineManifest: builds the plan with `plan` and writes it with its manifest."""

    def __init__(self, plan: Callable[[], bytes], engines_dir: Path, fields: Mapping[str, Any]):
        self.plan = plan
        self.engines_dir = Path(engines_dir)
        self.fields = fields  # every EngineManifest field except the plan's own and the timing

    def __call__(self) -> EngineManifest:
        t0 = time.perf_counter()
        data = self.plan()
        manifest = EngineManifest(
            **self.fields,
            plan_file=f"{self.fields['step']}.plan",
            plan_sha256=sha256_bytes(data),
            plan_bytes=len(data),
            build_seconds=round(time.perf_counter() - t0, 3),
        )
        write_engine(self.engines_dir, manifest, data)
        return manifest


class EngineFromPath:
    """() -> (ICudaEngine, EngineManifest): `check_engine` first (manifest vs export graph, the
    running TensorRT and this GPU, plan bytes vs their sha256), then deserialize. A plan is
    never deserialized without its manifest."""

    def __init__(self, engines_dir: Path, step: str, graph: Mapping, machine: Machine, hint: str):
        self.engines_dir = Path(engines_dir)
        self.step, self.graph, self.machine, self.hint = step, graph, machine, hint

    def __call__(self) -> tuple[Any, EngineManifest]:
        manifest, data = check_engine(self.engines_dir, self.step, self.graph, self.machine, self.hint)
        trt = _import_tensorrt()
        engine = trt_runtime(trt).deserialize_cuda_engine(data)
        if engine is None:
            raise ManifestMismatch(
                f"engine {self.step}: TensorRT could not deserialize {manifest.plan_file}; {self.hint}"
            )
        return engine, manifest


# ------------------------------------------------------------------------------ build all
@dataclass
class BuildRecord:
    step: str
    status: str  # "built" | "up to date"
    cache_key: str
    profiles: list[dict]
    plan: str
    plan_bytes: int
    seconds: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# progress: ("start" | "skip" | "done", step, index, total, record or None)
BuildProgress = Callable[[str, str, int, int, "BuildRecord | None"], None]


def build_engines(
    artifacts_dir: Path | str,
    engines_dir: Path | str | None = None,
    profile: Mapping[str, int] | None = None,
    max_batch: int = 1,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    timing_cache: Path | str | None = None,
    force: bool = False,
    progress: BuildProgress | None = None,
    opt_level: int | None = None,
) -> list[BuildRecord]:
    """One engine per step graph of the export in `artifacts_dir`, into `engines_dir` (default
    ARTIFACTS/engines), for the current CUDA device. An engine whose cache key matches an intact
    plan is skipped (unless `force`). The timing cache (default ENGINES/timing.cache) is shared
    by every build. Input errors are raised before any TensorRT work."""
    from fastblt.export.manifest import read_manifest, verify_files

    if opt_level is not None and not 0 <= opt_level <= 5:
        raise InputError(f"--opt-level {opt_level}: expected 0..5 (TensorRT builder optimization level)")
    artifacts_dir = Path(artifacts_dir)
    engines_dir = Path(engines_dir) if engines_dir is not None else artifacts_dir / ENGINES_DIR
    timing_cache = Path(timing_cache) if timing_cache is not None else engines_dir / "timing.cache"
    manifest = read_manifest(artifacts_dir)
    profiles = manifest_profiles(manifest, profile, max_batch)
    machine = current_machine()
    verify_files(artifacts_dir, manifest)  # the ONNX files are the ones the manifest hashes
    flags = build_flags(int(workspace_gb * (1 << 30)), opt_level)
    records = []
    steps = list(manifest["graphs"])
    for i, step in enumerate(steps):
        graph = manifest["graphs"][step]
        dicts = [p.to_dict() for p in profiles[step]]
        key = engine_cache_key(
            graph["sha256"], machine.trt_version, machine.gpu_name, machine.compute_capability, dicts, flags
        )
        plan = plan_path(engines_dir, step)
        if not force and up_to_date(engines_dir, step, key):
            rec = BuildRecord(step, "up to date", key, dicts, str(plan), plan.stat().st_size, 0.0)
            if progress:
                progress("skip", step, i, len(steps), rec)
            records.append(rec)
            continue
        if progress:
            progress("start", step, i, len(steps), None)
        fields = {
            "step": step,
            "onnx_file": graph["file"],
            "onnx_sha256": dict(graph["sha256"]),
            **asdict(machine),
            "profiles": dicts,
            "build_flags": flags,
            "cache_key": key,
        }
        m = _build_one(artifacts_dir, engines_dir, manifest, profiles[step], fields, timing_cache)
        rec = BuildRecord(step, "built", key, dicts, str(plan), m.plan_bytes, m.build_seconds)
        if progress:
            progress("done", step, i, len(steps), rec)
        records.append(rec)
    return records


def _build_one(
    artifacts_dir: Path,
    engines_dir: Path,
    manifest: Mapping,
    profiles: Sequence[Profile],
    fields: dict[str, Any],
    timing_cache: Path,
) -> EngineManifest:
    """The loader chain for one graph: ONNX path -> network -> plan bytes -> plan + manifest."""
    from fastblt.version import __version__

    step, flags = fields["step"], fields["build_flags"]
    inputs = graph_inputs(manifest, step)
    network = NetworkFromOnnxPath(artifacts_dir / fields["onnx_file"], [t.name for t in inputs])
    plan = EngineBytesFromNetwork(
        network, inputs, profiles, flags["workspace_bytes"], timing_cache, flags["builder_optimization_level"]
    )
    return SaveEngine(plan, engines_dir, {**fields, "fastblt_version": __version__})()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
