"""`fastblt validate` on a tiny exported checkpoint: passes when intact, fails and names what broke.

Broken artifacts are copies of the session's export with one graph edited (its sha256 re-synced
in the manifest, so the file checks pass and only the numbers can tell).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from validate_helpers import MAX_STEP, broken_copy, run_cli, scopes

from fastblt.engines.base import Backend
from fastblt.engines.registry import available
from fastblt.engines.torch_backend import TorchBackend
from fastblt.export.options import ExportOptions
from fastblt.formats.checkpoint import save_checkpoint
from fastblt.validate.e2e import E2ERun, e2e_parity
from fastblt.validate.graphs import reference_specs

from tiny import make_model

FAST = ["--no-real", "--no-e2e", "--threads", "1"]


def _validate(args, monkeypatch, capsys):
    code, out, err = run_cli(["validate", *args], monkeypatch, capsys)
    return code, (json.loads(out) if "--json" in args and out.strip() else None), out, err


def test_intact_artifacts_pass_for_torch_and_ort_in_fp32(ckpt, artifacts, monkeypatch, capsys, tmp_path):
    args = ["--checkpoint", str(ckpt), "--artifacts", str(artifacts), "--threads", "1", "--json"]
    code, report, _, err = _validate([*args, "--report", str(tmp_path / "r")], monkeypatch, capsys)
    assert code == 0, err
    assert report["verdict"] == "pass" and report["compared"] > 500 and report["meta"]["dtype"] == "float32"
    graphs = report["pairs"]["torch vs ort"]["graphs"]
    assert {"entropy", "encoder", "global", "decoder", "decoder_block"} <= set(graphs)
    assert {f"e2e/{m}" for m in ("ar", "blt-s", "blt-d", "blt-dv")} <= set(graphs)
    cases = graphs["decoder"]["outputs"]["logits"]["cases"]
    assert any(c.startswith("random") for c in cases) and any(c.startswith("real") for c in cases)
    assert (tmp_path / "r" / "report.md").read_text().startswith("# fastblt validate: PASS")
    assert (tmp_path / "r" / "error_per_layer.png").is_file()


def _perturb_ffn(layer: int):
    def edit(proto: onnx.ModelProto) -> str:
        inits = {i.name: i for i in proto.graph.initializer}
        scope = f"model.local_decoder.layers.{layer}.feed_forward"  # w1 and w3: one fused MatMul
        node = next(n for n in proto.graph.node if n.op_type == "MatMul" and scope in scopes(n))
        name = next(x for x in node.input if x in inits)
        assert "feed_forward.w1.weight" in name
        w = numpy_helper.to_array(inits[name]).copy()
        w[0, 0] += 0.5
        inits[name].CopyFrom(numpy_helper.from_array(w, name))
        return name

    return edit


def test_a_perturbed_weight_fails_and_names_the_graph_and_the_layer(ckpt, artifacts, monkeypatch, capsys, tmp_path):
    bad, _ = broken_copy(artifacts, tmp_path / "bad", "decoder", _perturb_ffn(1))
    args = ["--checkpoint", str(ckpt), "--artifacts", str(bad), *FAST, "--json"]
    code, report, _, err = _validate([*args, "--report", str(tmp_path / "r")], monkeypatch, capsys)
    assert code == 1, err
    failed = {g for g, v in report["pairs"]["torch vs ort"]["graphs"].items() if not v["passed"]}
    assert failed == {"decoder"}
    layers = report["layers"]["torch vs ort | decoder"]
    assert layers["first_layer"] == "local_decoder.layers.1"
    assert layers["first_module"] == "local_decoder.layers.1.feed_forward"
    assert any("first diverging layer local_decoder.layers.1" in line for line in report["failures"])
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Per layer: torch vs ort | decoder" in md and "**FIRST**" in md


def _unmask(proto: onnx.ModelProto) -> str:
    """Drop the mask's sliding window (q - k < window becomes q - k < 10^6): slots outside the
    window, and ring slots holding no position yet, become visible."""
    inits = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "Less" or node.input[1] not in inits:
            continue
        x = node.input[1]
        value = numpy_helper.to_array(inits[x])
        if value.size == 1 and value.dtype == np.int32:  # q - k < window: the only such compare
            inits[x].CopyFrom(numpy_helper.from_array(np.full_like(value, 10**6), x))
            return x
    raise AssertionError("no window constant found")


def test_a_wrong_mask_fails_and_names_the_graph(ckpt, artifacts, monkeypatch, capsys, tmp_path):
    bad, _ = broken_copy(artifacts, tmp_path / "bad", "encoder", _unmask)
    args = ["--checkpoint", str(ckpt), "--artifacts", str(bad), *FAST, "--json"]
    code, report, out, err = _validate(args, monkeypatch, capsys)
    assert code == 1, err
    failed = {g for g, v in report["pairs"]["torch vs ort"]["graphs"].items() if not v["passed"]}
    assert failed == {"encoder"}
    assert report["layers"]["torch vs ort | encoder"]["first_layer"] == "local_encoder.layers.0"


class CacheOffByOne(Backend):
    """Writes nothing wrong itself but reads the encoder cache one slot late, as if the runtime had
    written every entry at position + 1."""

    name = "ort"

    def __init__(self, inner: Backend):
        super().__init__(inner.specs)
        self.inner = inner

    def _activate_impl(self) -> None:
        self.inner.activate()

    def _run_step_impl(self, step, feeds):
        if step == "encoder":
            feeds = {k: torch.roll(v, 1, dims=2) if k.startswith("past.") else v for k, v in feeds.items()}
        return self.inner.run_step(step, feeds, check=False)


def test_a_cache_at_the_wrong_position_names_the_first_diverging_step(model, artifacts):
    from fastblt.engines.ort_backend import OrtBackend

    specs = ExportOptions(max_step=MAX_STEP).specs(model.config)
    ref = TorchBackend(reference_specs(specs), model)
    cand = CacheOffByOne(OrtBackend(specs, artifacts, threads=1))
    prompt = "def f(x):\n    return x"
    run = E2ERun(modes=("ar",), max_bytes=12)
    report = e2e_parity(model, ref, {"ort": cand}, [prompt], run)
    assert not report
    res = report[("torch", "ort")]["e2e/ar"]["bytes"]["prompt 0"]
    assert res.first_diff is not None and res.margin is not None
    assert res.step["step"] == "encoder" and res.step["module"] == "local_encoder" and res.step["output"] == "h"
    assert res.step["start"] == MAX_STEP  # the second prefill chunk: the first call to read the first's entries
    # the prompt (23 ids) is committed in two parts split at its cut, MAX_STEP: calls #0-#3 are the
    # first chunk's encoder, entropy, global and decoder steps, #4 the second chunk's encoder
    assert f"first diverging step #4: encoder (local_encoder) at position {MAX_STEP}" in report.failures()[0]


def test_artifacts_of_another_checkpoint_are_refused(artifacts, monkeypatch, capsys, tmp_path):
    other = tmp_path / "other"
    save_checkpoint(make_model("hf-test-sizes", n_dec=2, seed=1), other)
    code, _, _, err = _validate(["--checkpoint", str(other), "--artifacts", str(artifacts), *FAST], monkeypatch, capsys)
    assert code == 2
    assert "manifest.json: field checkpoint.hash: the artifacts were exported from checkpoint" in err


@pytest.mark.skipif(available()["trt"].available, reason="TensorRT is available here: nothing is missing")
def test_a_missing_backend_is_skipped_with_its_reason_not_passed(ckpt, artifacts, monkeypatch, capsys):
    args = ["--checkpoint", str(ckpt), "--artifacts", str(artifacts), "--backends", "ort,trt", *FAST]
    code, report, out, err = _validate([*args, "--graphs", "entropy", "--json"], monkeypatch, capsys)
    assert code == 3, err
    assert report["skipped"] == [{"what": "trt", "reason": available()["trt"].reason}]
    assert all("trt" not in pair for pair in report["pairs"])
    code, _, out, _ = _validate(["--checkpoint", str(ckpt), "--backends", "trt", *FAST], monkeypatch, capsys)
    assert code == 3 and "skipped trt:" in out  # nothing ran at all: not a pass, and not a failed gate either


@pytest.mark.parametrize("kind", ["missing", "directory", "binary", "empty"])
def test_an_unreadable_prompt_file_is_a_clear_error(kind, ckpt, monkeypatch, capsys, tmp_path):
    path = tmp_path / "prompts.txt"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe\x00bad")
    elif kind == "empty":
        path.write_text("\n\n")
    code, _, _, err = _validate(["--checkpoint", str(ckpt), "--prompts", str(path), *FAST], monkeypatch, capsys)
    assert code == 2
    assert err.startswith(f"error: --prompts {path}: ")


def test_prompt_file_formats(tmp_path):
    from fastblt.cli.validate import read_prompts

    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "b.txt").write_text("def f():\n    pass\n---\nimport os\n")
    (tmp_path / "c.json").write_text(json.dumps(["x = 1\n", "y"]))
    assert read_prompts(tmp_path / "a.txt") == ("one", "two")
    assert read_prompts(tmp_path / "b.txt") == ("def f():\n    pass", "import os")
    assert read_prompts(tmp_path / "c.json") == ("x = 1\n", "y")


def test_torch_only_validation_passes_without_artifacts(ckpt, monkeypatch, capsys):
    args = ["--checkpoint", str(ckpt), "--backends", "torch", "--max-step", "16", "--threads", "1", "--json"]
    code, report, _, err = _validate([*args, "--max-bytes", "8"], monkeypatch, capsys)
    assert code == 0, err
    assert report["compared"] > 100 and list(report["pairs"]) == ["torch vs torch"]


def test_without_artifacts_the_cached_export_is_found_and_reused(ckpt, artifacts, monkeypatch, capsys, tmp_path):
    """No --artifacts: validate exports into <cache>/<hash[:16]>/<dtype>-step<max_step> (the runtime's
    layout) unless an up-to-date export is there; here it is, so nothing is exported."""
    import shutil

    from fastblt.formats.checkpoint import checkpoint_hash

    cached = tmp_path / "cache" / checkpoint_hash(ckpt)[:16] / f"float32-step{MAX_STEP}"
    shutil.copytree(artifacts, cached)
    args = ["--checkpoint", str(ckpt), "--max-step", str(MAX_STEP), "--cache-dir", str(tmp_path / "cache"), *FAST]
    code, report, _, err = _validate([*args, "--graphs", "decoder", "--json"], monkeypatch, capsys)
    assert code == 0, err
    assert report["meta"]["artifacts"] == str(cached) and "exporting" not in err


def test_a_mode_asked_for_that_the_checkpoint_cannot_run_is_bad_input(monkeypatch, capsys, tmp_path):
    plain = save_checkpoint(make_model(blt_d=False), tmp_path / "plain")
    code, _, _, err = _validate(["--checkpoint", str(plain), "--modes", "ar,blt-d", *FAST], monkeypatch, capsys)
    assert code == 2 and "--modes blt-d: needs a BLT-D checkpoint" in err


def test_saved_inputs_of_other_graphs_are_bad_input(ckpt, artifacts, monkeypatch, capsys, tmp_path):
    base = ["--checkpoint", str(ckpt), "--artifacts", str(artifacts), "--backends", "ort", *FAST]
    code, _, _, err = _validate([*base, "--graphs", "entropy", "--save-inputs", str(tmp_path / "in")], monkeypatch,
                                capsys)  # fmt: skip
    assert code == 0, err
    code, _, _, err = _validate([*base, "--graphs", "encoder", "--load-inputs", str(tmp_path / "in")], monkeypatch,
                                capsys)  # fmt: skip
    assert code == 2 and "holds inputs of entropy, none of --graphs encoder" in err


@pytest.mark.skipif(available()["trt"].available, reason="TensorRT is available here: nothing is missing")
def test_a_failed_gate_beside_a_missing_backend_is_a_failure(ckpt, artifacts, monkeypatch, capsys, tmp_path):
    """A gate that failed on the backends that did run is exit 1, even when another requested
    backend was unavailable: exit 3 ("could not run here") would hide a wrong export from CI."""
    bad, _ = broken_copy(artifacts, tmp_path / "bad", "decoder", _perturb_ffn(1))
    args = ["--checkpoint", str(ckpt), "--artifacts", str(bad), "--backends", "ort,trt", *FAST, "--no-layers"]
    code, report, _, err = _validate([*args, "--graphs", "decoder", "--json"], monkeypatch, capsys)
    assert code == 1, err
    assert report["failed"] > 0 and [s["what"] for s in report["skipped"]] == ["trt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: the device exists")
def test_a_device_this_machine_lacks_is_exit_3(ckpt, monkeypatch, capsys):
    """`--device cuda` without CUDA is "cannot run here" (exit 3, as for a missing backend), not bad
    input (exit 2): a CI matrix skips the job instead of reporting a broken command line."""
    args = ["--checkpoint", str(ckpt), "--backends", "torch", "--device", "cuda", *FAST]
    code, _, out, err = _validate(args, monkeypatch, capsys)
    assert code == 3 and out == "", err
    assert err.startswith("error: device 'cuda': CUDA is not available here")


def test_a_dtype_other_than_the_artifacts_is_refused(ckpt, artifacts, monkeypatch, capsys):
    """`--dtype fp16` on fp32 artifacts must not silently validate fp32 graphs under fp32 gates (the
    user would believe the fp16 deployment passed): exit 2 naming both dtypes."""
    args = ["--checkpoint", str(ckpt), "--artifacts", str(artifacts), "--dtype", "fp16", *FAST]
    code, _, _, err = _validate([*args, "--graphs", "entropy"], monkeypatch, capsys)
    assert code == 2
    # the advice names values --dtype accepts (fp32, not float32, which it would refuse)
    assert "--dtype fp16: the artifacts were exported in fp32; pass --dtype fp32" in err
    assert "float" not in err


def _no_validation(*args, **kwargs):
    raise AssertionError("validation ran: the bad output path was not refused before the work")


@pytest.mark.parametrize("flag", ["--report", "--save-inputs", "--save-outputs"])
def test_outputs_holding_a_users_files_are_refused_before_any_work(flag, ckpt, monkeypatch, capsys, tmp_path):
    """An output directory that already holds files (report.md for --report, anything for the
    others), or a regular file, is exit 2 naming it, before the run: nothing the user had is
    overwritten, and a long validation is not lost to a path that was wrong from the start."""
    monkeypatch.setattr("fastblt.validate.run.validate", _no_validation)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / ("report.md" if flag == "--report" else "notes.txt")).write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    base = ["--checkpoint", str(ckpt), "--backends", "torch", *FAST]
    for where, why in ((taken, "pass --force"), (a_file, "exists and is not a directory"),
                       (a_file / "sub", f"{a_file} is not a directory")):  # fmt: skip
        code, _, out, err = _validate([*base, flag, str(where)], monkeypatch, capsys)
        assert code == 2 and err.startswith(f"error: {flag} {where}: ") and why in err, err
        assert len(err.splitlines()) == 1 and out == ""
    assert [p.read_text() for p in taken.iterdir()] == ["mine"]  # the user's file, alone and intact
    assert a_file.read_text() == "mine"


def test_force_replaces_an_earlier_report_and_saved_inputs(ckpt, monkeypatch, capsys, tmp_path):
    """--force replaces what an earlier run wrote (its saved inputs of steps this run does not save
    too: --load-inputs would replay them) and leaves the user's other files alone."""
    base = ["--checkpoint", str(ckpt), "--backends", "torch", "--max-step", str(MAX_STEP), *FAST]
    report, saved = tmp_path / "report", tmp_path / "in"
    report.mkdir()
    (report / "report.md").write_text("earlier")
    saved.mkdir()
    (saved / "notes.txt").write_text("mine")
    (saved / "inputs.encoder.json").write_text("earlier")
    args = [*base, "--graphs", "entropy", "--report", str(report), "--save-inputs", str(saved), "--force"]
    code, _, _, err = _validate(args, monkeypatch, capsys)
    assert code == 0, err
    assert {"report.json", "report.md"} <= {p.name for p in report.iterdir()}
    assert (report / "report.md").read_text().startswith("# fastblt validate: PASS")
    assert sorted(p.name for p in saved.iterdir()) == ["cases.json", "inputs.entropy.json", "notes.txt"]
    assert (saved / "notes.txt").read_text() == "mine"
