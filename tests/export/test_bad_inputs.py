"""A tampered manifest.json: every reader (export --check, generate --artifacts) refuses it with one
line that names the manifest and the field, not a traceback from the code that indexes it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from fastblt.errors import ManifestMismatch
from fastblt.export.manifest import MANIFEST, read_manifest

from export_helpers import run_cli


def _tampered(export: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    shutil.copytree(export, dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    edit(manifest)
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return dst


def _put(path: str, value) -> Callable[[dict], None]:
    """An edit that sets the manifest field `path` (dotted) to `value`."""
    *parents, key = path.split(".")

    def edit(manifest: dict) -> None:
        node = manifest
        for name in parents:
            node = node[name]
        node[key] = value

    return edit


TAMPERED = [  # (field, value): each is a type that no export writes
    ("graphs.encoder.sha256", "0" * 64),
    ("graphs.encoder", None),
    ("graphs.decoder.file", 3),
    ("graphs.decoder.file", "../other/decoder.onnx"),  # outside the export directory
    ("graphs.entropy.external_data", "/etc/passwd"),
    ("graphs.decoder.external_data", ["x"]),
    ("graphs.global.inputs", [{"name": "start"}]),
    ("options.max_step", "x"),
    ("options.max_batch", 0),
    ("options.dtype", "int4"),
    ("checkpoint.config", []),
    ("checkpoint.hash", 7),
    ("versions", "x"),
]


@pytest.mark.parametrize("field, value", TAMPERED, ids=[f for f, _ in TAMPERED])
def test_read_manifest_names_the_field(fp32_export, tmp_path, field, value):
    bad = _tampered(fp32_export, tmp_path / "bad", _put(field, value))
    with pytest.raises(ManifestMismatch) as e:
        read_manifest(bad)
    assert str(e.value).startswith(f"{bad / MANIFEST}: field {field}: expected ")


def test_an_untouched_copy_reads(fp32_export, tmp_path):
    good = _tampered(fp32_export, tmp_path / "good", lambda m: None)
    assert read_manifest(good)["graphs"].keys() == read_manifest(fp32_export)["graphs"].keys()


@pytest.mark.parametrize("field, value", [("graphs.encoder.sha256", "0" * 64), ("graphs.encoder", None),
                                          ("options.max_step", "x")])  # fmt: skip
def test_cli_readers_print_one_line(fp32_export, ckpt_dir, tmp_path, monkeypatch, capsys, field, value):
    bad = _tampered(fp32_export, tmp_path / "bad", _put(field, value))
    want = f"error: {bad / MANIFEST}: field {field}: expected "
    for args in (
        ["export", "--check", str(bad)],
        ["generate", "--checkpoint", str(ckpt_dir), "--artifacts", str(bad), "--prompt", "hi", "--max-bytes", "2"],
    ):
        code, _, err = run_cli(args, monkeypatch, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith(want), (args[0], err)


def test_max_step_shorter_than_a_diffusion_block_names_the_manifest(fp32_export, ckpt_dir, tmp_path, monkeypatch,
                                                                    capsys):  # fmt: skip
    """max_step 3 is a valid int, but no export of this BLT-D model (block 4) can have it."""
    bad = _tampered(fp32_export, tmp_path / "bad", _put("options.max_step", 3))
    for args in (
        ["export", "--check", str(bad)],
        ["generate", "--checkpoint", str(ckpt_dir), "--artifacts", str(bad), "--prompt", "hi", "--max-bytes", "2"],
    ):
        code, _, err = run_cli(args, monkeypatch, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, (args[0], err)
        assert lines[0].startswith(f"error: {bad / MANIFEST}: field ") and "diffusion block of 4" in lines[0]


def test_paths_that_are_not_utf8_are_one_line_before_any_work(fp32_export, ckpt_dir, tmp_path, monkeypatch, capsys):
    """onnx and onnxruntime take file names as UTF-8 strings: a directory whose name is other bytes
    (Python holds them as lone surrogates) is refused by name, and nothing is written."""
    name = b"graphs\xff".decode("utf-8", "surrogateescape")
    copied, out = tmp_path / "in" / name, tmp_path / "out" / name
    shutil.copytree(fp32_export, copied)
    for args, what, path in (
        (["export", "--checkpoint", str(ckpt_dir), "--out", str(out)], "export directory", out),
        (
            ["generate", "--checkpoint", str(ckpt_dir), "--artifacts", str(copied), "--prompt", "hi"],
            "artifacts",
            copied,
        ),
    ):
        code, _, err = run_cli(args, monkeypatch, capsys)
        shown = str(path.parent) + "/graphs\\xff"
        want = f"error: {what} {shown}: not UTF-8; ONNX graphs are read and written only by UTF-8 paths"
        assert code == 2 and [line for line in err.splitlines() if line.startswith("error:")] == [want], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
