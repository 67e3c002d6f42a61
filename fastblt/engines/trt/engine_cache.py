"""The engine cache: one key function, the engine manifest, and the check that guards every load.

An engine (`{step}.plan`) is only ever read together with its manifest (`{step}.engine.json`),
which records what the plan was built from and for:

    format, format_version        "fastblt-engine", 1
    step, onnx_file, onnx_sha256  the graph (sha256 per file, .onnx and external data, as in the
                                  export manifest)
    trt_version, gpu_name, compute_capability
    profiles, build_flags         what the builder was asked for
    cache_key                     engine_cache_key(...) of all the above
    plan_file, plan_sha256, plan_bytes, build_seconds, fastblt_version

TensorRT plans are not portable across TensorRT versions or GPU compute capabilities, and a plan
must never be deserialized from an untrusted source (TensorRT 11 migration guide, deploy_notes.md
§1.8). So `check_engine` refuses, before any deserialization, a plan whose manifest is missing,
unreadable, for another graph, TensorRT version or GPU, or whose bytes are not the ones recorded,
and the message names the field and the command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastblt.errors import ManifestMismatch

FORMAT, FORMAT_VERSION = "fastblt-engine", 1
ENGINES_DIR = "engines"  # default engine directory, inside the export directory


@dataclass(frozen=True)
class Machine:
    """What a plan is bound to besides its graph: the TensorRT build and the GPU."""

    trt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"


def engine_cache_key(
    onnx_sha256: Mapping[str, str],
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    profiles: list[dict],
    build_flags: Mapping[str, Any],
) -> str:
    """THE engine-cache key (the only place it is computed): sha256 of a canonical JSON of the
    graph's file hashes, the TensorRT version, the GPU and its compute capability, the profiles
    (`Profile.to_dict()`, in build order: profile i is context i) and the build flags."""
    payload = {
        "onnx_sha256": dict(sorted(onnx_sha256.items())),
        "trt_version": trt_version,
        "gpu_name": gpu_name,
        "compute_capability": compute_capability,
        "profiles": profiles,
        "build_flags": dict(sorted(build_flags.items())),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class EngineManifest:
    step: str
    onnx_file: str
    onnx_sha256: dict[str, str]
    trt_version: str
    gpu_name: str
    compute_capability: str
    profiles: list[dict]
    build_flags: dict[str, Any]
    cache_key: str
    plan_file: str
    plan_sha256: str
    plan_bytes: int
    build_seconds: float
    fastblt_version: str
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping, where: str) -> EngineManifest:
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, Mapping) else type(d).__name__
            raise ManifestMismatch(f"{where}: format {got!r}, expected {FORMAT!r}")
        if d.get("format_version") != FORMAT_VERSION:
            raise ManifestMismatch(f"{where}: format_version {d.get('format_version')!r}, expected {FORMAT_VERSION}")
        names = set(cls.__dataclass_fields__)
        missing = sorted(names - set(d))
        if missing:
            raise ManifestMismatch(f"{where}: missing field(s) {missing}")
        return cls(**{k: d[k] for k in names})

    def key_now(self) -> str:
        """The key recomputed from this manifest's own fields (detects an edited manifest)."""
        return engine_cache_key(
            self.onnx_sha256, self.trt_version, self.gpu_name, self.compute_capability, self.profiles, self.build_flags
        )


def plan_path(engines_dir: Path, step: str) -> Path:
    return Path(engines_dir) / f"{step}.plan"


def manifest_path(engines_dir: Path, step: str) -> Path:
    return Path(engines_dir) / f"{step}.engine.json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rebuild_hint(artifacts_dir: Path | str, engines_dir: Path | str | None = None) -> str:
    cmd = f"fastblt build --artifacts {artifacts_dir}"
    if engines_dir is not None and Path(engines_dir) != Path(artifacts_dir) / ENGINES_DIR:
        cmd += f" --engines {engines_dir}"
    return f"rebuild with: {cmd}"


def read_engine_manifest(engines_dir: Path, step: str, hint: str) -> EngineManifest:
    """The manifest of `{step}.plan`; ManifestMismatch if there is none or it is unreadable."""
    path = manifest_path(engines_dir, step)
    if not path.is_file():
        plan = plan_path(engines_dir, step)
        what = f"{plan} has no manifest {path.name}; refusing to deserialize it" if plan.exists() else "no engine"
        raise ManifestMismatch(f"engine {step} ({path}): {what}; {hint}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestMismatch(f"engine {step} ({path}): unreadable manifest ({e}); {hint}") from None
    return EngineManifest.from_dict(data, f"engine {step} ({path})")


def expected_fields(graph: Mapping, machine: Machine) -> dict[str, tuple[Any, str]]:
    """Field -> (value this machine and export need, where that value comes from)."""
    return {
        "onnx_file": (graph["file"], "the export manifest"),
        "onnx_sha256": (dict(graph["sha256"]), "the export manifest"),
        "trt_version": (machine.trt_version, "the running TensorRT"),
        "gpu_name": (machine.gpu_name, "this GPU"),
        "compute_capability": (machine.compute_capability, "this GPU"),
    }


def check_engine(
    engines_dir: Path, step: str, graph: Mapping, machine: Machine, hint: str
) -> tuple[EngineManifest, bytes]:
    """Verify `{step}.plan` against its manifest, the export's graph entry and this machine, and
    return (manifest, plan bytes). Raises ManifestMismatch naming the first differing field;
    nothing is deserialized here (the caller does that only after this returns)."""
    m = read_engine_manifest(engines_dir, step, hint)
    where = f"engine {step} ({manifest_path(engines_dir, step)})"
    if m.step != step:
        raise ManifestMismatch(f"{where}: field step differs: manifest has {m.step!r}, expected {step!r}; {hint}")
    for name, (want, source) in expected_fields(graph, machine).items():
        got = getattr(m, name)
        if got != want:
            raise ManifestMismatch(
                f"{where}: field {name} differs: engine built for {got!r}, {source} has {want!r}; {hint}"
            )
    if m.cache_key != m.key_now():
        raise ManifestMismatch(
            f"{where}: field cache_key differs: recorded {m.cache_key[:16]}, its fields give {m.key_now()[:16]} "
            f"(the manifest was edited); {hint}"
        )
    plan = Path(engines_dir) / m.plan_file
    if plan.resolve() != plan_path(engines_dir, step).resolve():
        raise ManifestMismatch(f"{where}: field plan_file is {m.plan_file!r}, expected {step}.plan; {hint}")
    if not plan.is_file():
        raise ManifestMismatch(f"{where}: plan file {plan} is missing; {hint}")
    data = plan.read_bytes()
    got_sha = sha256_bytes(data)
    if got_sha != m.plan_sha256:
        raise ManifestMismatch(
            f"{where}: field plan_sha256 differs: {plan.name} has {got_sha[:16]}, manifest {m.plan_sha256[:16]} "
            f"(the plan was replaced or truncated); {hint}"
        )
    return m, data


def up_to_date(engines_dir: Path, step: str, key: str) -> bool:
    """Whether `{step}.plan` exists with a readable manifest of this key and intact bytes (for
    `fastblt build`'s skip; loading always runs the full `check_engine`)."""
    try:
        m = read_engine_manifest(engines_dir, step, "")
    except ManifestMismatch:
        return False
    plan = plan_path(engines_dir, step)
    return m.cache_key == key == m.key_now() and plan.is_file() and sha256_bytes(plan.read_bytes()) == m.plan_sha256


def write_engine(engines_dir: Path, manifest: EngineManifest, plan: bytes) -> tuple[Path, Path]:
    """Write the plan, then its manifest, each atomically (temp file + rename). A crash between
    the two leaves a plan whose old or missing manifest `check_engine` refuses."""
    engines_dir = Path(engines_dir)
    engines_dir.mkdir(parents=True, exist_ok=True)
    paths = plan_path(engines_dir, manifest.step), manifest_path(engines_dir, manifest.step)
    for path, data in zip(paths, (plan, (json.dumps(manifest.to_dict(), indent=2) + "\n").encode()), strict=True):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return paths
