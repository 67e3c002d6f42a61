"""`fastblt export` maps model.safetensors with fastblt's own parser (formats/checkpoint.py); it
refuses every header the format forbids, in one line naming the file and the tensor, as the
safetensors library does for `info` and `generate`: a view of bytes outside a tensor's own would
export wrong weights that every later check passes."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fastblt.errors import CheckpointError
from fastblt.export.exporter import mapped_weights
from fastblt.formats.checkpoint import WEIGHTS

from export_helpers import MAX_STEP, run_cli

Edit = Callable[[dict, str], "dict | list | int | bytes | None"]  # (header, first tensor) -> a new header or None


def _rewritten(ckpt: Path, dst: Path, edit: Edit, data_extra: bytes = b"") -> Path:
    """A copy of the checkpoint whose model.safetensors header is `edit`ed (written by hand: 8-byte
    little-endian length, the JSON, the data unchanged)."""
    shutil.copytree(ckpt, dst)
    raw = (dst / WEIGHTS).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    first = min(k for k in header if k != "__metadata__")
    new = edit(header, first)
    text = new if isinstance(new, bytes) else json.dumps(header if new is None else new).encode()
    (dst / WEIGHTS).write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :] + data_extra)
    return dst


def _set(field: str, value) -> Edit:
    def edit(header: dict, first: str) -> None:
        header[first][field] = value

    return edit


def _shifted(header: dict, first: str) -> None:
    begin, end = header[first]["data_offsets"]
    header[first]["data_offsets"] = [-100, end - begin - 100]  # the right length, starting in the header


def _past_the_end(header: dict, first: str) -> None:
    end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    begin, stop = header[first]["data_offsets"]
    header[first]["data_offsets"] = [end, end + stop - begin]


def _aliased(header: dict, first: str) -> None:
    """`first` views another tensor's bytes of the same length (its own left unindexed)."""
    size = header[first]["data_offsets"][1] - header[first]["data_offsets"][0]
    other = next(k for k, e in header.items() if k not in (first, "__metadata__")
                 and e["data_offsets"][1] - e["data_offsets"][0] == size)  # fmt: skip
    header[first]["data_offsets"] = list(header[other]["data_offsets"])


BAD_TENSORS = {  # name: (edit, what the message says besides the file and the tensor)
    "negative offsets": (_shifted, "data_offsets [-"),
    "offsets past the data": (_past_the_end, "ends past the end of the file: data_offsets ["),
    "offsets of another tensor": (_aliased, "data_offsets ["),
    "offsets a string": (_set("data_offsets", "ab"), "data_offsets 'ab': expected [begin, end]"),
    "offsets reversed": (lambda h, f: _set("data_offsets", h[f]["data_offsets"][::-1])(h, f), "begin <= end"),
    "offsets too short": (_set("data_offsets", [0, 4]), "data_offsets [0, 4] span 4 bytes"),
    "entry a string": (lambda h, f: h.__setitem__(f, "oops"), "header entry 'oops': expected an object"),
    "shape a string": (_set("shape", "abc"), "shape 'abc': expected a list of non-negative ints"),
    "shape negative": (_set("shape", [-1, 128]), "shape [-1, 128]"),
    "shape missing": (lambda h, f: h.__setitem__(f, {k: v for k, v in h[f].items() if k != "shape"}), "shape None"),
    "dtype unknown": (_set("dtype", "F8_E4M3"), "dtype 'F8_E4M3': expected one of"),
    "dtype of another size": (_set("dtype", "I64"), "of I64 needs"),
}

BAD_FILES = {  # name: (edit, what the message says after the file's name)
    "header a list": (lambda h, f: [1, 2, 3], "safetensors header is [1, 2, 3], expected a JSON object"),
    "header a number": (lambda h, f: 42, "safetensors header is 42, expected a JSON object"),
    "header empty": (lambda h, f: b"", "safetensors header is not UTF-8 JSON"),
    "header not UTF-8": (lambda h, f: b'{"\xff": 1}', "safetensors header is not UTF-8 JSON"),
    "metadata not strings": (lambda h, f: h.__setitem__("__metadata__", {"format": 1}), "__metadata__"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_bad_tensor_entries_name_the_file_and_tensor(ckpt_dir, tmp_path, case):
    edit, says = BAD_TENSORS[case]
    bad = _rewritten(ckpt_dir, tmp_path / "bad", edit)
    first = min(k for k in json.loads(_header(bad)) if k != "__metadata__")
    with pytest.raises(CheckpointError) as e:
        mapped_weights(bad, torch.float32)
    message = str(e.value)
    assert message.startswith(f"{bad / WEIGHTS}: ") and "\n" not in message, message
    if case != "offsets of another tensor":  # the tensor named is whichever the sorted walk meets first
        assert f"tensor '{first}'" in message and says in message, message
    else:
        assert "overlaps the tensor before it" in message or "unindexed" in message, message


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_headers_name_the_file(ckpt_dir, tmp_path, case):
    edit, says = BAD_FILES[case]
    bad = _rewritten(ckpt_dir, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{bad / WEIGHTS}: ") + ".*" + re.escape(says)):
        mapped_weights(bad, torch.float32)


def test_header_length_past_the_end_of_the_file(ckpt_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt_dir, bad)
    raw = (bad / WEIGHTS).read_bytes()
    (bad / WEIGHTS).write_bytes((len(raw) + 1).to_bytes(8, "little") + raw[8:])
    with pytest.raises(CheckpointError, match=re.escape(f"{bad / WEIGHTS}: not a safetensors file (header length")):
        mapped_weights(bad, torch.float32)
    (bad / WEIGHTS).write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match=re.escape(f"{bad / WEIGHTS}: not a safetensors file")):
        mapped_weights(bad, torch.float32)


def test_a_header_length_past_the_limit_is_refused_without_reading_it(ckpt_dir, tmp_path):
    """A header length over 100 MB (the safetensors library's bound) is refused from the 8 length
    bytes alone, even when the file is that long: a hostile file cannot make fastblt read and parse
    a huge header. The file is sparse: no 100 MB are written."""
    bad = tmp_path / "bad"
    shutil.copytree(ckpt_dir, bad)
    n = 100_000_001
    with open(bad / WEIGHTS, "wb") as f:
        f.write(n.to_bytes(8, "little") + b"{}")
        f.truncate(8 + n + 16)
    with pytest.raises(CheckpointError, match=re.escape(f"{bad / WEIGHTS}: not a safetensors file (header length {n}")):
        mapped_weights(bad, torch.float32)


def test_trailing_unindexed_bytes_are_refused(ckpt_dir, tmp_path):
    bad = _rewritten(ckpt_dir, tmp_path / "bad", lambda h, f: None, data_extra=b"\0" * 16)
    with pytest.raises(CheckpointError, match="the tensors cover .* data bytes after the header"):
        mapped_weights(bad, torch.float32)


def test_a_rewritten_valid_header_maps_the_same_weights(ckpt_dir, tmp_path, ref_model):
    """The control: the hand-written header (no padding, another length) is still a valid file."""
    good = _rewritten(ckpt_dir, tmp_path / "good", lambda h, f: None)
    assert _header(good) != _header(ckpt_dir)
    _, weights = mapped_weights(good, torch.float32)
    for name, want in ref_model.state_dict().items():
        assert torch.equal(weights(name), want), name


def test_cli_export_refuses_negative_offsets_in_one_line(ckpt_dir, tmp_path, monkeypatch, capsys):
    bad = _rewritten(ckpt_dir, tmp_path / "bad", _shifted)
    out = tmp_path / "out"
    args = ["export", "--checkpoint", str(bad), "--out", str(out), "--max-step", str(MAX_STEP)]
    code, _, err = run_cli(args, monkeypatch, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"error: {bad / WEIGHTS}: tensor '") and "data_offsets [-" in errors[0]
    assert not out.exists()


def _header(ckpt: Path) -> bytes:
    raw = (ckpt / WEIGHTS).read_bytes()
    return raw[8 : 8 + int.from_bytes(raw[:8], "little")]
