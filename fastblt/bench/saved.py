"""A saved `fastblt bench` record (runtime_bench.json), read back for `--render`: checked whole,
every field rendering reads present and of the right JSON kind, before anything is written, so a
wrong file is one line naming the field and the saved results stay as they were."""

from __future__ import annotations

import json
from pathlib import Path

from fastblt.errors import InputError
from fastblt.formats.files import read_text

# What rendering reads from a saved record, checked before anything is written. A kind ending in
# " or null" also accepts null. "targets" and "notes" are recomputed, so they are not read.
_META_FIELDS = {
    "command": "a string",
    "date": "a string",
    "machine": "a string",
    "cpu_count": "an integer or null",
    "load_avg_at_start": "a list",
    "max_bytes": "an integer",
    "max_context": "an integer or null",
    "checkpoint": "a string",
    "torch": "a string",
    "onnxruntime": "a string or null",
    "prompts": "a list",
}
_ROW_FIELDS = {
    "name": "a string",
    "mode": "a string",
    "backend": "a string",
    "bytes_per_s": "a number",
    "ms_per_byte": "a number",
    "latency_p50_ms": "a number",
    "latency_p95_ms": "a number",
    "passes_per_byte": "an object",
    "acceptance": "a number or null",
    "accept_hist": "an object",
    "unmask_steps": "an object",
    "eq8": "an object",
    "host_fraction": "a number",
    "per_prompt": "a list",
}
_HF_FIELDS = {
    "name": "a string",
    "transformers": "a string or null",
    "prompts": "a list",
    "bytes_per_s": "a number",
    "identical_to_ar": "an object",
}
_KINDS = {
    "an object": lambda v: isinstance(v, dict),
    "a list": lambda v: isinstance(v, list),
    "a string": lambda v: isinstance(v, str),
    "a number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "true or false": lambda v: isinstance(v, bool),
}


def _json_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return next(k for k, ok in _KINDS.items() if k != "an integer" and ok(value))


def _check(value, kind: str, where: str, label: str) -> None:
    base = kind.removesuffix(" or null")
    if (value is None and base != kind) or _KINDS[base](value):
        return
    raise InputError(f"{label}: {where}: expected {kind}, got {_json_kind(value)}")


def _fields(obj: dict, fields: dict[str, str], where: str, label: str, optional: dict[str, str] | None = None) -> None:
    """`where` is the path of `obj` with its trailing dot ("rows[2]."), or "" at the top."""
    for key, kind in fields.items():
        if key not in obj:
            raise InputError(f"{label}: {where}{key}: missing")
        _check(obj[key], kind, f"{where}{key}", label)
    for key, kind in (optional or {}).items():
        if key in obj:
            _check(obj[key], kind, f"{where}{key}", label)


def _each(items: list, kind: str, where: str, label: str) -> None:
    for i, v in enumerate(items):
        _check(v, kind, f"{where}[{i}]", label)


def _values(obj: dict, kind: str, where: str, label: str) -> None:
    for k, v in obj.items():
        _check(v, kind, f"{where}.{k}", label)


def _histogram(obj: dict, where: str, label: str) -> None:
    for k, v in obj.items():
        if not k.lstrip("-").isdigit():
            raise InputError(f"{label}: {where}: key {k!r} is not an integer")
        _check(v, "a number", f"{where}.{k}", label)


def check_result(result, label: str) -> None:
    """Everything rendering reads, present and of the right JSON kind; InputError naming the field."""
    _check(result, "an object", "top level", label)
    _fields(result, {"meta": "an object", "rows": "a list"}, "", label, {"hf": "an object or null"})
    meta, rows = result["meta"], result["rows"]
    _fields(meta, _META_FIELDS, "meta.", label, {"threads": "an integer or null", "devices": "an object"})
    _each(meta["load_avg_at_start"], "a number", "meta.load_avg_at_start", label)
    for i, p in enumerate(meta["prompts"]):
        _check(p, "an object", f"meta.prompts[{i}]", label)
        _fields(p, {"file": "a string", "bytes": "an integer"}, f"meta.prompts[{i}].", label)
    _values(meta.get("devices", {}), "a string", "meta.devices", label)
    if not rows:
        raise InputError(f"{label}: rows: empty, expected the measured rows")
    for i, r in enumerate(rows):
        where = f"rows[{i}]"
        _check(r, "an object", where, label)
        _fields(r, _ROW_FIELDS, f"{where}.", label, {
            "identical_to_ar": "true or false", "ar_bits_per_byte": "a number", "lookup_rounds": "an integer",
        })  # fmt: skip
        if r["mode"] == "blt-d":  # its = ar column and the block-start note read the agreements
            _fields(r, {"ar_positional_agreement": "a number", "ar_prefix_agreement": "a number"}, f"{where}.", label)
        if r.get("lookup_rounds"):
            _fields(r, {"rounds": "an integer", "lookup_acceptance": "a number"}, f"{where}.", label)
        _values(r["passes_per_byte"], "a number", f"{where}.passes_per_byte", label)
        _histogram(r["accept_hist"], f"{where}.accept_hist", label)
        _histogram(r["unmask_steps"], f"{where}.unmask_steps", label)
        for split in ("this", "blt-1b", "blt-3b"):
            _fields(r["eq8"], {split: "an object"}, f"{where}.eq8.", label)
            _fields(r["eq8"][split], {"bytes_per_byte": "a number"}, f"{where}.eq8.{split}.", label)
        for j, p in enumerate(r["per_prompt"]):
            _check(p, "an object", f"{where}.per_prompt[{j}]", label)
            _fields(p, {"bytes": "an integer", "decode_s": "a number"}, f"{where}.per_prompt[{j}].", label)
    hf = result.get("hf")
    if hf is not None:
        _fields(hf, _HF_FIELDS, "hf.", label)
        _values(hf["identical_to_ar"], "true or false", "hf.identical_to_ar", label)


def load_result(path: Path) -> dict:
    """A saved runtime_bench.json, read and checked whole; InputError (one line) naming the file."""
    label = f"--render {path}"
    text = read_text(path, label, "a runtime_bench.json")
    try:
        result = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{label}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise InputError(f"{label}: invalid JSON (nested too deeply)") from None
    check_result(result, label)
    return result
