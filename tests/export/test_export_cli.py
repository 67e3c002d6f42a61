"""`fastblt export`: layout and manifest, progress, --json, up to date, --force, --check, bad input."""

from __future__ import annotations

import copy
import json
import shutil

import onnx
import pytest

from fastblt.errors import InputError, ManifestMismatch
from fastblt.export import exporter
from fastblt.export.checks import TrtOpTable, load_trt_ops
from fastblt.export.exporter import export_model
from fastblt.export.manifest import MANIFEST, read_manifest, sha256_file, write_manifest
from fastblt.export.options import ExportOptions, existing_export
from fastblt.export.spec import STEPS, step_specs
from fastblt.formats.checkpoint import checkpoint_hash
from fastblt.model.config import BltConfig

from export_helpers import MAX_STEP, run_cli


def _export_args(ckpt, out, *extra: str) -> list[str]:
    return ["export", "--checkpoint", str(ckpt), "--out", str(out), "--max-step", str(MAX_STEP), *extra]


def _copying_export_step(source):
    """A stand-in for export_step that copies the graph from an existing export (fast)."""

    def export_step(config, spec, weights, path, dtype, threshold):
        shutil.copy(source / f"{spec.name}.onnx", path)
        return exporter.GraphRecord(spec.name, path.name, None, path.stat().st_size, {"Add": 1}, 0, 0.0)

    return export_step


def _leftovers(parent, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_manifest_describes_every_graph(fp32_export, ckpt_dir, ref_model):
    m = read_manifest(fp32_export)
    assert m["checkpoint"]["hash"] == checkpoint_hash(ckpt_dir)
    assert BltConfig.from_dict(m["checkpoint"]["config"]) == ref_model.config
    assert m["options"] == {"dtype": "float32", "opset": 24, "max_step": MAX_STEP, "max_batch": 64}
    assert {"torch", "onnx", "onnxscript", "onnxruntime", "fastblt"} <= set(m["versions"])
    assert m["dims"]["new"] == {"min": 1, "max": MAX_STEP}
    assert m["dims"]["past"] == {"min": 1, "max": 4096}  # the global model's position limit
    assert m["dims"]["patch_len"] == {"min": 1, "max": 6}  # max_patch_length
    specs = step_specs(ref_model.config, MAX_STEP)
    assert list(m["graphs"]) == list(STEPS)
    for step, g in m["graphs"].items():
        assert g["inputs"] == specs[step].to_dict()["inputs"]
        assert g["outputs"] == specs[step].to_dict()["outputs"]
        assert g["opset"] == 24
        assert g["slots"] == ("past" if step == "global" else 24 + MAX_STEP)  # window 24: rings
        assert g["aliases"] == dict(specs[step].aliases)
        assert g["sha256"][g["file"]] == sha256_file(fp32_export / g["file"])
        assert all(c["status"] == "pass" for c in g["checks"].values()), g["checks"]
        assert g["nodes"] == sum(g["op_counts"].values()) > 0
        proto = onnx.load(str(fp32_export / g["file"]), load_external_data=False)
        assert proto.opset_import[0].version == 24
        shapes = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input]
        assert shapes == [t["shape"] for t in g["inputs"]]
    assert sorted(p.name for p in fp32_export.iterdir()) == sorted([MANIFEST, *(f"{s}.onnx" for s in STEPS)])


def test_progress_per_graph_and_json(fp32_run):
    for i, step in enumerate(STEPS):
        assert f"[{i + 1}/5] {step}" in fp32_run.stderr
    summary = json.loads(fp32_run.stdout)
    assert summary["up_to_date"] is False
    assert list(summary["graphs"]) == list(STEPS)
    assert summary["graphs"]["encoder"]["checks"]["hash_ids"]["status"] == "pass"


def test_same_export_is_up_to_date(fp32_export, ckpt_dir, monkeypatch, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in fp32_export.iterdir()}
    code, out, err = run_cli(_export_args(ckpt_dir, fp32_export, "--json"), monkeypatch, capsys)
    assert code == 0, err
    assert "up to date" in err
    assert json.loads(out)["up_to_date"] is True
    assert {p.name: p.stat().st_mtime_ns for p in fp32_export.iterdir()} == before


def test_different_export_needs_force(fp32_export, ckpt_dir, monkeypatch, capsys):
    before = read_manifest(fp32_export)
    code, _, err = run_cli(_export_args(ckpt_dir, fp32_export, "--dtype", "fp16"), monkeypatch, capsys)
    assert code == 2
    assert "different export" in err and "dtype 'float32' -> 'float16'" in err and "--force" in err
    assert read_manifest(fp32_export) == before


def test_force_replaces_atomically(fp32_export, ckpt_dir, tmp_path, monkeypatch, capsys):
    """--force swaps the new export in (graph export stubbed: this tests the file handling)."""
    out = tmp_path / "exp"
    shutil.copytree(fp32_export, out)
    real = read_manifest(out)

    monkeypatch.setattr(exporter, "export_step", _copying_export_step(fp32_export))
    monkeypatch.setattr(exporter, "check_graph", lambda *a, **k: [])
    code, _, err = run_cli(_export_args(ckpt_dir, out, "--max-batch", "2", "--force"), monkeypatch, capsys)
    assert code == 0, err
    m = read_manifest(out)
    assert m["options"]["max_batch"] == 2 and real["options"]["max_batch"] == 64
    assert _leftovers(tmp_path, "exp") == []


def test_check_dir_passes_and_catches_changed_files(fp32_export, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["export", "--check", str(fp32_export), "--json"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads(out)["passed"] is True
    bad = tmp_path / "bad"
    shutil.copytree(fp32_export, bad)
    with open(bad / "decoder.onnx", "r+b") as f:  # flip one byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    code, _, err = run_cli(["export", "--check", str(bad)], monkeypatch, capsys)
    assert code == 1
    assert "decoder" in err and "sha256" in err


def test_check_dir_catches_a_changed_external_data_file(fp16_export, tmp_path, monkeypatch, capsys):
    """A big model's weights live in <graph>.onnx.data: a corrupted (or swapped) data file must fail
    --check like a corrupted graph, or the export would silently compute other weights."""
    bad = tmp_path / "bad"
    shutil.copytree(fp16_export, bad)
    entry = read_manifest(bad)["graphs"]["decoder"]
    data = bad / entry["external_data"]
    assert entry["external_data"].endswith(".onnx.data") and entry["sha256"][entry["external_data"]]
    with open(data, "r+b") as f:  # flip the lowest bit of one weight
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x01]))
    code, _, err = run_cli(["export", "--check", str(bad)], monkeypatch, capsys)
    assert code == 1, err
    assert entry["external_data"] in err and "sha256" in err


def test_check_dir_without_manifest(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["export", "--check", str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and "no manifest" in err


def test_failing_graph_check_leaves_nothing(ckpt_dir, fp32_export, tmp_path, monkeypatch, capsys):
    """A graph that fails a (real) check stops the export; graph export stubbed with the real files."""
    table = load_trt_ops()
    no_matmul = TrtOpTable(table.opset_min, table.opset_max, {k: v for k, v in table.types.items() if k != "MatMul"},
                           table.const_inputs, table.source)  # fmt: skip
    monkeypatch.setattr("fastblt.export.checks.load_trt_ops", lambda *a: no_matmul)
    monkeypatch.setattr(exporter, "export_step", _copying_export_step(fp32_export))
    out = tmp_path / "exp"
    code, _, err = run_cli(_export_args(ckpt_dir, out), monkeypatch, capsys)
    assert code == 1
    assert "graph entropy" in err and "trt_ops" in err and "MatMul" in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dtype", "int8"], "Invalid value for '--dtype'"),
        (["--opset", "17"], "opset 17: unsupported"),
        (["--max-step", "1"], "max_step 1: expected an int >= 2"),
    ],
)
def test_bad_options(ckpt_dir, tmp_path, monkeypatch, capsys, extra, message):
    code, _, err = run_cli(["export", "--checkpoint", str(ckpt_dir), "--out", str(tmp_path / "x"), *extra],
                           monkeypatch, capsys)  # fmt: skip
    assert code == 2
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_that_fails_to_load(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "config.json").write_text('{"format": "fastblt", "format_version": 1, "model": {"encoder": 3}}')
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    code, _, err = run_cli(["export", "--checkpoint", str(bad), "--out", str(tmp_path / "x")], monkeypatch, capsys)
    assert code == 2
    assert err.startswith("error: ") and "encoder" in err
    assert not (tmp_path / "x").exists()
    code, _, err = run_cli(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x")],
                           monkeypatch, capsys)  # fmt: skip
    assert code == 2 and "no such checkpoint" in err


def test_out_dir_with_other_files_is_refused(ckpt_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run_cli(_export_args(ckpt_dir, tmp_path), monkeypatch, capsys)
    assert code == 2 and "notes.txt" in err and "--force" in err
    # what it is: a directory of the user's files, not "a different export"
    assert f"{tmp_path}: is a directory that holds other files (notes.txt), not an export;" in err
    assert "different export" not in err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_export_model_without_force_keeps_a_directory_of_other_files(ref_model, tmp_path):
    """The API refuses, like the CLI, to replace a directory that is not this export: without
    `force` a user's files there must survive (ManifestMismatch, nothing written)."""
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ManifestMismatch, match=r"holds other files \(notes\.txt\).*--force"):
        export_model(copy.deepcopy(ref_model), tmp_path, ExportOptions(max_step=MAX_STEP), checkpoint_hash="0" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _flip_byte(path, at: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("change", ["graph file", "checkpoint", "graph code"])
def test_existing_export_is_not_the_same(fp32_export, ckpt_dir, tmp_path, change):
    """An export is reused ("same", nothing re-exported) only with intact files, the same checkpoint
    and the same graph code: any of them changed must make it a different export, said why, or a
    corrupted or stale export would be served as up to date."""
    out = tmp_path / "exp"
    shutil.copytree(fp32_export, out)
    ckpt, options = checkpoint_hash(ckpt_dir), ExportOptions(max_step=MAX_STEP)
    assert existing_export(out, ckpt, options) == "same"
    if change == "graph file":
        _flip_byte(out / "encoder.onnx")
        expected = "its export is unreadable or changed"
        assert "graphs.encoder.sha256[encoder.onnx]" in existing_export(out, ckpt, options)
    elif change == "checkpoint":
        ckpt, expected = "0" * 64, f"it was exported from checkpoint {checkpoint_hash(ckpt_dir)[:12]}, not 000000000000"
    else:
        manifest = read_manifest(out)
        manifest["versions"]["graphs"] = "0" * 16
        write_manifest(out, manifest)
        expected = "(graph code 0000000000000000)"
    assert expected in existing_export(out, ckpt, options)


def test_export_model_refuses_weights_of_another_dtype(ref_model, tmp_path):
    """An fp32 model asked for a float16 export must be refused with the fix (cast it first), not
    exported into graphs whose declared dtype its weights do not have."""
    out = tmp_path / "exp"
    with pytest.raises(InputError, match=r"model weights are \['torch.float32'\].*float16.*cast it first"):
        export_model(copy.deepcopy(ref_model), out, ExportOptions(dtype="fp16", max_step=MAX_STEP))
    assert not out.exists()


def test_check_export_catches_a_manifest_whose_specs_were_edited(fp32_export, tmp_path):
    """check_export must compare the manifest's recorded graph I/O with the specs its config gives:
    a manifest claiming other shapes (what the runtime binds buffers from) must not pass."""
    out = tmp_path / "exp"
    shutil.copytree(fp32_export, out)
    manifest = read_manifest(out)
    manifest["graphs"]["encoder"]["inputs"][0]["shape"] = ["batch", 7]
    write_manifest(out, manifest)
    with pytest.raises(ManifestMismatch, match=r"graphs\.encoder\.inputs\[0\] \(tokens\)\.shape"):
        exporter.check_export(out)
