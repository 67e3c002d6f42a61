"""manifest.json: what an export directory holds, and the one place that verifies it.

Layout (format "fastblt-export", version 2: in-place ring and linear caches):
    checkpoint: {hash, source, config}           the model the graphs compute
    options:    {dtype, opset, max_step, max_batch}
    dims:       {batch|new|patches|patch_len|past: {min, max}}   named dynamic dimensions
    versions:   {fastblt, torch, onnx, onnxscript, onnxruntime}
    graphs:     {step: {file, external_data, sha256: {file: hex}, bytes, opset, stack, slots,
                        max_step, aliases, inputs, outputs, op_counts, export_seconds, checks}}
Every graph's inputs/outputs are its StepSpec (export/spec.py) as data: name, dtype, shape with
named dynamic dims. The runtime and the engine builder read this file, never guess.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastblt.errors import ManifestMismatch
from fastblt.export.spec import FLOAT_DTYPES, StepSpec

MANIFEST = "manifest.json"
FORMAT, FORMAT_VERSION = "fastblt-export", 2


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def graph_files(entry: dict) -> list[str]:
    """The files of one graph entry: the .onnx and, if any, its external data."""
    return [entry["file"], *([entry["external_data"]] if entry.get("external_data") else [])]


def graphs_revision() -> str:
    """A digest of the code that writes the graphs (the builder and the contract it follows):
    an export written by other code is a different export, whatever the version number says."""
    h = hashlib.sha256()
    for name in ("graphs.py", "spec.py"):
        h.update((Path(__file__).with_name(name)).read_bytes())
    return h.hexdigest()[:16]


def code_versions() -> dict[str, str]:
    """What decides whether an export is current: fastblt's version and the graph code's digest
    (read without importing onnx, so finding a cached export stays cheap)."""
    from fastblt.version import __version__

    return {"fastblt": __version__, "graphs": graphs_revision()}


def versions() -> dict[str, str]:
    """code_versions and the libraries an export was written and checked with (for the manifest)."""
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    return {
        **code_versions(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def write_manifest(directory: Path, manifest: dict) -> Path:
    """Write atomically (temp file + rename): a reader never sees half a manifest."""
    path = Path(directory) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(directory: Path) -> dict:
    """The manifest of an export directory, its fields' types checked: every reader may index it."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ManifestMismatch(f"{path}: no manifest (not a fastblt export directory)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON and UTF-8 errors alike
        raise ManifestMismatch(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestMismatch(f"{path}: format {_get(manifest, 'format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestMismatch(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    _check_fields(manifest, path)
    return manifest


def verify_files(directory: Path, manifest: dict, steps: list[str] | None = None) -> None:
    """Every graph file exists and has the sha256 the manifest records (ManifestMismatch if not)."""
    directory = Path(directory)
    for step in steps or list(manifest["graphs"]):
        entry = manifest["graphs"].get(step)
        if entry is None:
            raise ManifestMismatch(f"{directory / MANIFEST}: field graphs.{step}: missing")
        for name in graph_files(entry):
            path = directory / name
            if not path.is_file():
                raise ManifestMismatch(f"{path}: graph file of {step} is missing")
            want = entry.get("sha256", {}).get(name)
            got = sha256_file(path)
            if got != want:
                raise ManifestMismatch(f"{path}: field graphs.{step}.sha256[{name}]: file has {got}, manifest {want}")


def verify_specs(manifest: dict, specs: dict[str, StepSpec], where: str = MANIFEST) -> None:
    """The manifest's graphs are exactly `specs`: same steps, I/O names, dtypes and shapes."""
    graphs = manifest["graphs"]
    if sorted(graphs) != sorted(specs):
        raise ManifestMismatch(f"{where}: field graphs: steps {sorted(graphs)}, expected {sorted(specs)}")
    for step, spec in specs.items():
        want = spec.to_dict()
        for kind in ("inputs", "outputs"):
            got_list, want_list = graphs[step].get(kind, []), want[kind]
            if [t.get("name") for t in got_list] != [t["name"] for t in want_list]:
                raise ManifestMismatch(
                    f"{where}: field graphs.{step}.{kind}: names {[t.get('name') for t in got_list]}, "
                    f"expected {[t['name'] for t in want_list]}"
                )
            for i, (got, exp) in enumerate(zip(got_list, want_list, strict=True)):
                for key in ("dtype", "shape"):
                    if got.get(key) != exp[key]:
                        raise ManifestMismatch(
                            f"{where}: field graphs.{step}.{kind}[{i}] ({exp['name']}).{key}: "
                            f"{got.get(key)}, expected {exp[key]}"
                        )


def verify_source(manifest: dict, config: dict, where: Path, checkpoint_hash: str | None = None) -> None:
    """The artifacts compute this checkpoint: the manifest's model config equals `config` field by
    field, and, when `checkpoint_hash` is known, the recorded hash equals it (ManifestMismatch names
    the first field that differs)."""
    recorded = manifest["checkpoint"].get("hash")
    if checkpoint_hash is not None and recorded != checkpoint_hash:
        raise ManifestMismatch(
            f"{where}: field checkpoint.hash: the artifacts were exported from checkpoint {str(recorded)[:12]} "
            f"({manifest['checkpoint'].get('source')}), this checkpoint is {checkpoint_hash[:12]}; export it again"
        )
    want = json.loads(json.dumps(config))  # tuples -> lists, as the manifest holds it
    got = manifest["checkpoint"].get("config")
    if got != want:
        raise ManifestMismatch(
            f"{where}: field {_first_diff(got, want, 'checkpoint.config')}; the artifacts come from another model"
        )


def _first_diff(a: Any, b: Any, where: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_diff(a.get(k), b.get(k), f"{where}.{k}")
    return f"{where}: artifacts have {a!r}, the checkpoint has {b!r}"


def _get(d: Any, key: str) -> Any:
    return d.get(key) if isinstance(d, dict) else None


# ------------------------------------------------------------------------------ field types
# Every field a reader indexes is checked here, once: a hand-edited or truncated manifest is then
# a one-line ManifestMismatch naming the field, not an AttributeError deep in a backend.
_Is = Callable[[Any], bool]


@dataclass(frozen=True)
class _Field:
    """What a field's value must satisfy, and how the error message says it."""

    ok: _Is
    expected: str
    required: bool = True


def _int_at_least(low: int) -> _Is:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _tensor(t: Any) -> bool:
    return (
        isinstance(t, dict)
        and isinstance(t.get("name"), str)
        and isinstance(t.get("dtype"), str)
        and isinstance(t.get("shape"), list)
    )


def _tensor_list(v: Any) -> bool:
    return isinstance(v, list) and all(_tensor(t) for t in v)


_OBJECT = _Field(lambda v: isinstance(v, dict), "an object")
_STR_OR_NULL = _Field(lambda v: v is None or isinstance(v, str), "a string or null", required=False)
_TENSORS = _Field(_tensor_list, "a list of {name, dtype, shape} objects")
_TOP = {
    "checkpoint": _OBJECT,
    "options": _OBJECT,
    "dims": _Field(_OBJECT.ok, _OBJECT.expected, required=False),
    "versions": _Field(_OBJECT.ok, _OBJECT.expected, required=False),
    "graphs": _Field(_OBJECT.ok, "an object {step: graph}"),
}
_CHECKPOINT = {"config": _OBJECT, "hash": _STR_OR_NULL, "source": _STR_OR_NULL}
_OPTIONS = {
    "dtype": _Field(lambda v: v in FLOAT_DTYPES.values(), f"one of {', '.join(FLOAT_DTYPES.values())}"),
    "opset": _Field(_int_at_least(1), "an int"),
    "max_step": _Field(_int_at_least(2), "an int >= 2"),
    "max_batch": _Field(_int_at_least(1), "an int >= 1"),
}


def _file_name(v: Any) -> bool:
    """A name inside the export directory: a manifest never points elsewhere."""
    return isinstance(v, str) and v not in ("", ".", "..") and Path(v).name == v and "\\" not in v


_GRAPH = {
    "file": _Field(_file_name, "a file name in the export directory"),
    "external_data": _Field(
        lambda v: v is None or _file_name(v), "a file name in the export directory, or null", required=False
    ),  # fmt: skip
    "sha256": _Field(
        lambda v: isinstance(v, dict) and all(isinstance(h, str) for h in v.values()),
        "an object {file name: sha256 hex}",
    ),
    "inputs": _TENSORS,
    "outputs": _TENSORS,
}


def _check_fields(manifest: dict, path: Path) -> None:
    """The type (and, for options, the range) of every field fastblt reads; ManifestMismatch names
    the first wrong one by its path, e.g. graphs.encoder.sha256."""
    _check(manifest, _TOP, "", path)
    _check(manifest["checkpoint"], _CHECKPOINT, "checkpoint.", path)
    _check(manifest["options"], _OPTIONS, "options.", path)
    graphs = manifest["graphs"]
    _check(graphs, dict.fromkeys(graphs, _OBJECT), "graphs.", path)
    for step, entry in graphs.items():
        _check(entry, _GRAPH, f"graphs.{step}.", path)


def _check(obj: dict, fields: dict[str, _Field], prefix: str, path: Path) -> None:
    for key, field in fields.items():
        if key not in obj:
            if field.required:
                raise ManifestMismatch(f"{path}: field {prefix}{key}: missing (expected {field.expected})")
        elif not field.ok(obj[key]):
            raise ManifestMismatch(f"{path}: field {prefix}{key}: expected {field.expected}, got {_short(obj[key])}")


def _short(value: Any, limit: int = 60) -> str:
    """`value` as JSON, cut to `limit` characters: the error stays one readable line."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
