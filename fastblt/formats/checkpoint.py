"""Load, save, hash and convert BLT checkpoints in four directory layouts.

- ``fastblt``: ``config.json`` {"format": "fastblt", "format_version": 1, "model": BltConfig} and
  ``model.safetensors`` with our (Meta) parameter names, entropy model under ``entropy_model.``.
- ``hf``: what transformers' ``BltForCausalLM.save_pretrained`` writes (``config.json`` with
  model_type "blt", ``model.safetensors`` or an index and shards); names mapped by keymap.py.
- ``meta-dump``: a Meta training dump, ``params.json`` (TrainArgs) + ``consolidated.pth``.
- ``meta-hub``: the facebook/blt-1b / blt-7b Hub repos, ``config.json`` {"args": ...} +
  ``model.safetensors`` with Meta names.
Both Meta layouts keep the entropy model in ``entropy_model/{params.json, consolidated.pth}``
(a meta-dump may also find it in the sibling folder ``../entropy_model``, as Meta's download
script lays it out); without it the model loads with no entropy model.

Every problem with the files is a CheckpointError (or ConfigError for a config field) that names
the file, tensor or field; weights load strictly (no missing, extra or reshaped tensor).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import safetensors.torch
import torch

from fastblt.errors import CheckpointError, ConfigError, InputError
from fastblt.formats import keymap, meta
from fastblt.formats.files import check_apart, replace_dir, staging_dir
from fastblt.model.blt import BltModel
from fastblt.model.config import BltConfig

FORMATS = ("fastblt", "hf", "meta-dump", "meta-hub")
FORMAT_VERSION = 1
CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
PARAMS, CONSOLIDATED, TRAIN_ARGS, ENTROPY_DIR = "params.json", "consolidated.pth", "train_args.json", "entropy_model"
ENTROPY_PREFIX = "entropy_model."
ASSETS = Path(__file__).resolve().parent.parent / "assets"  # package data: the embedded default
_META_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class OutputInUse(CheckpointError):
    """The output directory holds files that saving would replace: `what` says which, so that a
    caller can name its own way to allow it (here overwrite=True; `fastblt convert`: --force)."""

    def __init__(self, out: Path, what: str):
        super().__init__(out, what)  # both: it pickles like any exception
        self.out, self.what = out, what

    def __str__(self) -> str:
        return f"{self.out}: {self.what}; pass overwrite=True to replace it"


@dataclass(frozen=True)
class _Checkpoint:
    """A located checkpoint: its layout, config and the files that hold it."""

    root: Path
    fmt: str
    config: BltConfig
    config_files: tuple[Path, ...]
    weight_files: tuple[Path, ...]  # main weights (safetensors / consolidated.pth)
    entropy_weights: Path | None  # Meta layouts: entropy_model/consolidated.pth


# ------------------------------------------------------------------------------ public API
def resolve_checkpoint_path(name_or_path: str | Path) -> Path:
    """Map the name "default" to the embedded checkpoint (fastblt/assets/default); anything else is a path."""
    if str(name_or_path) == "default":
        path = ASSETS / "default"
        if not path.is_dir():
            raise CheckpointError(
                "the embedded default checkpoint is not built yet (fastblt/assets/default); run `fastblt train`"
            )
        return path
    return Path(name_or_path).expanduser()


def detect_format(path: str | Path) -> str:
    """The layout of the checkpoint directory `path`: "fastblt", "hf", "meta-dump" or "meta-hub"."""
    root = _checkpoint_dir(path)
    if (root / CONFIG).is_file():
        cfg = _read_json(root / CONFIG)
        if isinstance(cfg, dict) and cfg.get("format") == "fastblt":
            return "fastblt"
        if isinstance(cfg, dict) and isinstance(cfg.get("args"), dict):
            return "meta-hub"
        if isinstance(cfg, dict) and cfg.get("model_type") == "blt":
            return "hf"
        raise CheckpointError(
            f'{root / CONFIG}: not a BLT config: expected "format": "fastblt", "model_type": "blt" '
            '(Hugging Face) or an "args" object (Meta Hub)'
        )
    if (root / PARAMS).is_file():
        return "meta-dump"
    found = sorted(p.name for p in root.iterdir())[:8]
    raise CheckpointError(
        f"{root}: not a BLT checkpoint: expected {CONFIG} + {WEIGHTS} (fastblt, hf, meta-hub) "
        f"or {PARAMS} + {CONSOLIDATED} (meta-dump); found {found or 'an empty directory'}"
    )


def load_config(path: str | Path) -> BltConfig:
    """The BltConfig of the checkpoint directory `path` (or "default"); no weights are read."""
    return _locate(path).config


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> BltModel:
    """Load the checkpoint directory `path` (any format, or "default") into a BltModel in eval mode.

    Weights load strictly and floating tensors are cast to `dtype` (default float32; a torch
    dtype or its name: "float16", "bf16", ...).
    """
    dtype = _float_dtype(dtype)
    ckpt = _locate(path)
    return _build_model(ckpt, _read_state(ckpt), dtype or torch.float32)


_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip


def _float_dtype(dtype: object) -> torch.dtype | None:
    """None, a floating torch dtype, or the name of one; InputError naming `dtype` otherwise."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in _DTYPE_NAMES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower()]
    raise InputError(f"dtype: expected one of {', '.join(_DTYPE_NAMES)} (or the torch dtype), got {dtype!r}")


def load_mapped(path: str | Path) -> tuple[BltConfig, dict[str, torch.Tensor]]:
    """The checkpoint's config and tensors under our names, mapped from disk: a tensor costs memory
    only when read (and its pages can be dropped again), so a caller can cast and use a few tensors
    at a time (the exporter materializes one step graph's weights at a time).

    Checked like `load_checkpoint`: every tensor present, none extra, shapes, floating dtypes.
    Safetensors files are mapped zero-copy; Meta's consolidated.pth with torch.load(mmap=True).
    """
    ckpt = _locate(path)
    state = _read_state(ckpt, mapped=True)
    _check_state(ckpt, state, _expected_shapes(ckpt.config))
    return ckpt.config, state


def save_checkpoint(
    model: BltModel,
    out_dir: str | Path,
    fmt: str = "fastblt",
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a `fmt` checkpoint directory; floating weights cast to `dtype` if given.

    The files are written to a temporary directory next to `out_dir` and moved into place, so a
    failure leaves nothing half-written. A non-empty `out_dir` holding other files is refused
    unless `overwrite` (identical files are left as they are). Returns the directory.
    """
    if fmt not in FORMATS:
        raise CheckpointError(f"checkpoint format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in _META_DTYPES:
        raise CheckpointError(f"dtype {dtype}: expected one of float32, bfloat16, float16")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    config = model.config
    if fmt != "fastblt" and config.decoder_input_norm:
        raise CheckpointError(
            f"checkpoint format {fmt!r}: config field decoder_input_norm is fastblt's own (the released code "
            "has no such norm and would compute another model); save as 'fastblt'"
        )
    state = {k: _standalone(v.detach().cpu(), dtype) for k, v in model.state_dict().items()}
    existing = _files_under(out) if out.is_dir() else {}
    if existing and not overwrite and set(existing) != set(_layout_names(fmt, config)):
        raise OutputInUse(out, f"directory is not empty and holds other files ({', '.join(sorted(existing)[:5])})")
    tmp = staging_dir(out, "tmp")
    try:
        _WRITERS[fmt](tmp, config, state)
        if existing and not overwrite:
            if _same_files(tmp, out):
                return out
            raise OutputInUse(out, "holds a different checkpoint")
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def convert(
    src: str | Path, fmt: str, out_dir: str | Path, dtype: torch.dtype | None = None, overwrite: bool = False
) -> Path:
    """Convert the checkpoint `src` ("default" or a directory) to format `fmt` in `out_dir`.

    Floating weights keep their dtype unless `dtype` is given. Returns the output directory.
    """
    ckpt = _locate(src)
    out = Path(out_dir).expanduser()
    check_apart(out, ckpt.root, "source checkpoint")
    state = _read_state(ckpt)
    model = _build_model(ckpt, state, dtype or _dominant_dtype(state))
    return save_checkpoint(model, out, fmt, overwrite=overwrite)


def checkpoint_hash(path: str | Path) -> str:
    """sha256 (hex) over the format, the config files and the weight files, by relative name and content."""
    ckpt = _locate(path)
    files = [*ckpt.config_files, *ckpt.weight_files]
    if ckpt.entropy_weights is not None:
        files.append(ckpt.entropy_weights)
    h = hashlib.sha256(f"fastblt-checkpoint\0{ckpt.fmt}\0".encode())
    for f in sorted(set(files), key=lambda p: _relname(p, ckpt.root)):
        h.update(f"{_relname(f, ckpt.root)}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------ locating
def _checkpoint_dir(path: str | Path) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"{root}: no such checkpoint directory")
    if not root.is_dir():
        raise CheckpointError(
            f"{root}: is a file; pass the checkpoint directory that holds it "
            f"({CONFIG} + {WEIGHTS}, or {PARAMS} + {CONSOLIDATED})"
        )
    return root


def _locate(path: str | Path) -> _Checkpoint:
    root = _checkpoint_dir(resolve_checkpoint_path(path))
    fmt = detect_format(root)
    if fmt in ("fastblt", "hf"):
        raw = _read_json(root / CONFIG)
        with _config_errors(root / CONFIG):
            config = _fastblt_config(raw, root / CONFIG) if fmt == "fastblt" else _hf_config(raw)
        return _Checkpoint(root, fmt, config, (root / CONFIG,), _safetensors_files(root), None)
    return _locate_meta(root, fmt)


def _fastblt_config(raw: dict[str, Any], where: Path) -> BltConfig:
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: format_version {raw.get('format_version')!r} (this fastblt reads 1)")
    return BltConfig.from_dict(raw.get("model"))


def _hf_config(raw: dict[str, Any]) -> BltConfig:
    config = keymap.config_from_hf(raw)
    # transformers writes a patcher_config even when the model has no patcher (patch_in_forward false)
    if not raw.get("patch_in_forward", True) and config.entropy is not None:
        config = config.replace(entropy=None)
    return config


def _locate_meta(root: Path, fmt: str) -> _Checkpoint:
    main_cfg = root / (PARAMS if fmt == "meta-dump" else CONFIG)
    raw = _read_json(main_cfg)
    if not isinstance(raw, dict):
        raise ConfigError(f"{main_cfg}: expected a JSON object")
    config_files = [main_cfg]
    if fmt == "meta-dump":
        model, top, extras = raw.get("model"), raw, raw
        weight_files: tuple[Path, ...] = (_need_file(root / CONSOLIDATED),)
    else:
        args = raw["args"]
        # Meta's hub mixin writes the flat model args; a TrainArgs-shaped "args" is accepted too
        nested = isinstance(args.get("model"), dict)
        model, top = (args["model"], args) if nested else (args, {})
        extras = {**args, **raw}
        if not nested and (root / TRAIN_ARGS).is_file():
            top = _read_json(root / TRAIN_ARGS)
            config_files.append(root / TRAIN_ARGS)
        weight_files = _safetensors_files(root)
    if not isinstance(model, dict):
        raise ConfigError(f"{main_cfg}: config field model: expected the Meta model args object")
    entropy_dir = _meta_entropy_dir(root, fmt)
    entropy_raw: Any = {}
    if entropy_dir is not None:
        config_files.append(_need_file(entropy_dir / PARAMS))
        entropy_raw = _read_json(entropy_dir / PARAMS)
    patcher = _first_dict(_get(top, "data", "patcher_args"), _get(entropy_raw, "data", "patcher_args"))
    entropy_args = None
    if entropy_dir is not None:
        entropy_args = _first_dict(_get(entropy_raw, "entropy_model"), _get(top, "entropy_model"))
        if not entropy_args:
            raise ConfigError(f"{entropy_dir / PARAMS}: config field entropy_model: missing (the entropy model args)")
    args = meta.MetaArgs(model, entropy_args, patcher, {k: v for k, v in extras.items() if k.startswith("fastblt_")})
    with _config_errors(main_cfg):
        config = meta.config_from_meta(args)
    entropy_weights = None if entropy_dir is None else _need_file(entropy_dir / CONSOLIDATED)
    return _Checkpoint(root, fmt, config, tuple(config_files), weight_files, entropy_weights)


def _meta_entropy_dir(root: Path, fmt: str) -> Path | None:
    candidates = [root / ENTROPY_DIR] + ([root.parent / ENTROPY_DIR] if fmt == "meta-dump" else [])
    for d in candidates:
        if d.is_dir() and d.resolve() != root.resolve() and any((d / f).exists() for f in (PARAMS, CONSOLIDATED)):
            return d
    return None


def _safetensors_files(root: Path) -> tuple[Path, ...]:
    if (root / INDEX).is_file():
        index = _read_json(root / INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f'{root / INDEX}: expected a non-empty "weight_map" object')
        shards = sorted(set(weight_map.values()))
        return (root / INDEX, *(_need_file(root / s) for s in shards))
    return (_need_file(root / WEIGHTS),)


# ------------------------------------------------------------------------------ reading weights
def _read_state(ckpt: _Checkpoint, mapped: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint under our (Meta) names (mapped: backed by the files)."""
    files = ckpt.weight_files
    state = _read_pth(files[0], mapped) if ckpt.fmt == "meta-dump" else _read_safetensors_files(files, mapped)
    if ckpt.fmt == "hf":
        _check_fused_hash(state, ckpt.config, ckpt.weight_files[0])
        state = keymap.from_hf_state_dict(state, ckpt.config)
    if ckpt.entropy_weights is not None:
        for key, value in _read_pth(ckpt.entropy_weights, mapped).items():
            state[ENTROPY_PREFIX + key] = value
    return state


def _read_safetensors_files(files: tuple[Path, ...], mapped: bool = False) -> dict[str, torch.Tensor]:
    read = _map_safetensors if mapped else _read_safetensors
    if files[0].name != INDEX:
        return read(files[0])
    weight_map = _read_json(files[0])["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for shard in files[1:]:
        state.update(read(shard))
    absent = sorted(k for k in weight_map if k not in state)
    if absent:
        raise CheckpointError(f"{files[0]}: lists tensor(s) that no shard holds: {_names(absent)}")
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types; report them in one line
        raise CheckpointError(f"{path}: cannot read safetensors file ({_one_line(e)})") from None


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class _Entry(NamedTuple):
    """One tensor of a safetensors header: where its bytes lie in the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


_HEADER_LIMIT = 100_000_000  # the safetensors library's own bound on the JSON header


def _map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as zero-copy views of a private (copy-on-write) mapping.

    The format: 8-byte little-endian header size, a JSON header {name: {dtype, shape,
    data_offsets: [begin, end)} relative to the data after the header}, then the data.
    """
    try:
        with open(_need_file(path), "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        raise CheckpointError(f"{path}: cannot map safetensors file ({_one_line(e)})") from None
    base, entries = _safetensors_header(path, mm)
    state = {}
    for name, e in entries.items():
        count = math.prod(e.shape)
        flat = (
            torch.frombuffer(mm, dtype=e.dtype, count=count, offset=base + e.begin)
            if count
            else torch.empty(0, dtype=e.dtype)
        )
        state[name] = flat.view(e.shape)
    return state


def _safetensors_header(path: Path, buf: mmap.mmap) -> tuple[int, dict[str, _Entry]]:
    """The data section's start and the tensors of a safetensors file, checked as the format
    specifies (and as the safetensors library, which `load_checkpoint` reads through, checks):
    views of bytes outside a tensor's own would be silently wrong weights."""
    n = int.from_bytes(buf[:8], "little") if len(buf) >= 8 else -1
    if not 0 <= n <= min(len(buf) - 8, _HEADER_LIMIT):
        raise CheckpointError(
            f"{path}: not a safetensors file (header length {n} for a file of {len(buf)} bytes; "
            f"expected 8 bytes of length, then that many bytes of JSON header, up to {_HEADER_LIMIT})"
        )
    try:
        header = json.loads(buf[8 : 8 + n].decode("utf-8"))
    except (ValueError, RecursionError) as e:  # ValueError: UTF-8 and JSON errors alike
        raise CheckpointError(f"{path}: safetensors header is not UTF-8 JSON ({_one_line(e)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is {_brief(header)}, expected a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: safetensors __metadata__ {_brief(metadata)}: expected an object of strings")
    size = len(buf) - 8 - n
    entries = {name: _safetensors_entry(path, name, info, size) for name, info in header.items()}
    _check_coverage(path, entries, size)
    return 8 + n, entries


def _safetensors_entry(path: Path, name: str, info: Any, size: int) -> _Entry:
    """One header entry, its dtype, shape and data_offsets checked against each other and `size`."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(
            f"{where}: header entry {_brief(info)}: expected an object with dtype, shape and data_offsets"
        )
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    dtype = _SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise CheckpointError(f"{where}: dtype {_brief(dtype_name)}: expected one of {', '.join(_SAFETENSORS_DTYPES)}")
    if not _naturals(shape):
        raise CheckpointError(f"{where}: shape {_brief(shape)}: expected a list of non-negative ints")
    if not (_naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: data_offsets {_brief(offsets)}: expected [begin, end] with 0 <= begin <= end")
    if offsets[1] > size:  # most often a truncated download
        raise CheckpointError(
            f"{path}: cannot map safetensors file (tensor {name!r} ends past the end of the file: "
            f"data_offsets {offsets}, {size} bytes after the header)"
        )
    need = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != need:
        raise CheckpointError(
            f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes; "
            f"shape {shape} of {dtype_name} needs {need}"
        )
    return _Entry(dtype, tuple(shape), offsets[0], offsets[1])


def _check_coverage(path: Path, entries: dict[str, _Entry], size: int) -> None:
    """The tensors cover the data section exactly once, as the format requires: no tensor reads
    another's bytes, and no bytes hide unindexed between them."""
    at = 0
    for name, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin != at:
            what = "overlaps the tensor before it" if e.begin < at else f"leaves bytes {at}..{e.begin} unindexed"
            raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {[e.begin, e.end]} {what}")
        at = e.end
    if at != size:
        raise CheckpointError(f"{path}: the tensors cover {at} of the {size} data bytes after the header")


def _naturals(value: Any) -> bool:
    """A list of non-negative ints (true/false excluded: Python counts them as ints)."""
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _brief(value: Any, limit: int = 60) -> str:
    """`value`'s repr, cut to `limit` characters: a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_pth(path: Path, mapped: bool = False) -> dict[str, torch.Tensor]:
    """A Meta `consolidated.pth`: {"model": state dict}."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError:  # torch's own message suggests weights_only=False: never here
        raise CheckpointError(f"{path}: not a torch file of tensors only (read with weights_only=True)") from None
    except Exception as e:  # zipfile, EOF and torch errors alike
        raise CheckpointError(f"{path}: cannot read torch file ({_one_line(e)})") from None
    state = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f'{path}: expected a dict with the state dict under "model"')
    bad = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {_names(bad)}")
    return state


def _read_json(path: Path) -> Any:
    try:
        text = _need_file(path).read_text(encoding="utf-8")
        return json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({_one_line(e)})") from None


def _check_fused_hash(state: dict[str, torch.Tensor], config: BltConfig, where: Path) -> None:
    key = "model.encoder_hash_tok_embedding.weight"
    if key in state:
        rows = config.n_hash_tables * config.hash_vocab
        got = tuple(state[key].shape)
        if got != (rows, config.d_local):
            raise CheckpointError(
                f"{where}: tensor {key}: shape {got} in the checkpoint, config expects {(rows, config.d_local)}"
            )


def _build_model(ckpt: _Checkpoint, state: dict[str, torch.Tensor], dtype: torch.dtype) -> BltModel:
    """BltModel(config) with `state` loaded strictly, floating tensors cast to `dtype`, eval mode."""
    with torch.device("meta"):  # no random init: every parameter comes from the checkpoint
        model = BltModel(ckpt.config)
    _check_state(ckpt, state, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def _expected_shapes(config: BltConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in BltModel(config).state_dict().items()}


def _check_state(ckpt: _Checkpoint, state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Strict loading's checks, with messages that name the file and the tensor; and no NaN or Inf
    in any weight (a model holding one generates ids that are no bytes, without any error)."""
    where = ", ".join(str(f) for f in (*ckpt.weight_files, ckpt.entropy_weights) if f is not None)
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{where}: missing tensor(s) {_names(missing)}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor(s) {_names(extra)}")
    for key, shape in expected.items():
        got = state[key]
        if tuple(got.shape) != shape:
            raise CheckpointError(
                f"tensor {key}: shape {_shape(got.shape)} in the checkpoint, config expects {_shape(shape)}"
            )
        if not got.dtype.is_floating_point:
            raise CheckpointError(f"tensor {key}: dtype {got.dtype} in the checkpoint, expected a floating-point type")
        if not torch.isfinite(got).all():
            bad = int((~torch.isfinite(got)).sum())
            raise CheckpointError(f"{where}: tensor {key}: {bad} of {got.numel()} values are NaN or infinite")


# ------------------------------------------------------------------------------ writing
def _write_fastblt(out: Path, config: BltConfig, state: dict[str, torch.Tensor]) -> None:
    _write_json(out / CONFIG, {"format": "fastblt", "format_version": FORMAT_VERSION, "model": config.to_dict()})
    _write_safetensors(out / WEIGHTS, state)


def _write_hf(out: Path, config: BltConfig, state: dict[str, torch.Tensor]) -> None:
    hf_config = keymap.config_to_hf(config)  # ConfigError when the HF layout cannot express `config`
    hf_config["dtype"] = str(_dominant_dtype(state)).removeprefix("torch.")
    _write_json(out / CONFIG, hf_config)
    _write_safetensors(out / WEIGHTS, keymap.to_hf_state_dict(state, config))


def _write_meta(out: Path, config: BltConfig, state: dict[str, torch.Tensor], fmt: str) -> None:
    args = meta.config_to_meta(config)
    params = meta.train_args(args, _META_DTYPES[_dominant_dtype(state)])
    main = {k: v for k, v in state.items() if not k.startswith(ENTROPY_PREFIX)}
    if fmt == "meta-dump":
        _write_json(out / PARAMS, params)
        torch.save({"model": main}, out / CONSOLIDATED)
    else:
        _write_json(out / CONFIG, {"args": args.model, **args.extras})
        _write_json(out / TRAIN_ARGS, params)
        _write_safetensors(out / WEIGHTS, main)
    if config.entropy is not None:
        (out / ENTROPY_DIR).mkdir()
        entropy = {k[len(ENTROPY_PREFIX) :]: v for k, v in state.items() if k.startswith(ENTROPY_PREFIX)}
        _write_json(out / ENTROPY_DIR / PARAMS, params)
        torch.save({"model": entropy}, out / ENTROPY_DIR / CONSOLIDATED)


_WRITERS = {
    "fastblt": _write_fastblt,
    "hf": _write_hf,
    "meta-dump": partial(_write_meta, fmt="meta-dump"),
    "meta-hub": partial(_write_meta, fmt="meta-hub"),
}


def _layout_names(fmt: str, config: BltConfig) -> set[str]:
    """The relative file names save_checkpoint writes for `fmt`."""
    names = {"fastblt": {CONFIG, WEIGHTS}, "hf": {CONFIG, WEIGHTS}}.get(fmt)
    if names is not None:
        return names
    names = {PARAMS, CONSOLIDATED} if fmt == "meta-dump" else {CONFIG, TRAIN_ARGS, WEIGHTS}
    if config.entropy is not None:
        names |= {f"{ENTROPY_DIR}/{PARAMS}", f"{ENTROPY_DIR}/{CONSOLIDATED}"}
    return names


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _write_safetensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    safetensors.torch.save_file(
        {k: _standalone(v, None) for k, v in state.items()}, str(path), metadata={"format": "pt"}
    )


def _standalone(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`t` (cast to `dtype` if floating) owning its own contiguous storage: safetensors refuses shared views."""
    if dtype is not None and t.dtype.is_floating_point:
        t = t.to(dtype)
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _files_under(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if not p.is_dir()}


def _same_files(a: Path, b: Path) -> bool:
    fa, fb = _files_under(a), _files_under(b)
    return fa.keys() == fb.keys() and all(fa[k].read_bytes() == fb[k].read_bytes() for k in fa)


# ------------------------------------------------------------------------------ small helpers
@contextmanager
def _config_errors(where: Path) -> Iterator[None]:
    """Re-raise config problems as ConfigError with the config file's name in front."""
    try:
        yield
    except CheckpointError:
        raise
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise ConfigError(f"{where}: malformed config ({_one_line(e)})") from None


def _need_file(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    return path


def _get(d: Any, *keys: str) -> Any:
    for key in keys:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def _first_dict(*candidates: Any) -> dict[str, Any]:
    return next((c for c in candidates if isinstance(c, dict) and c), {})


def _dominant_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most elements of `state` (float32 when there is none)."""
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.dtype.is_floating_point:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    dtype = max(counts, key=counts.__getitem__) if counts else torch.float32
    return dtype if dtype in _META_DTYPES else torch.float32


def _names(keys: list[str], shown: int = 5) -> str:
    more = ", ..." if len(keys) > shown else ""
    return f"{', '.join(keys[:shown])}{more} ({len(keys)} in all)"


def _shape(shape: Any) -> str:
    return "(" + ", ".join(str(int(n)) for n in shape) + ")"


def _relname(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # the sibling ../entropy_model of a meta dump
        return "../" + path.relative_to(root.parent).as_posix()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
