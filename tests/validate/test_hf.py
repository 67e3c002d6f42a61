"""`--reference hf`: our torch reference vs transformers' BltForCausalLM on the same weights."""

from __future__ import annotations

import pytest
import torch
from validate_helpers import run_cli

from fastblt.formats.checkpoint import load_checkpoint, save_checkpoint

from tiny import make_model

pytest.importorskip("transformers")

PROMPT = "def f(x):\n    return x"


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "ckpt"
    save_checkpoint(make_model("hf-test-sizes", blt_d=False), path, fmt="hf")
    return path


def test_reference_hf_passes_on_a_random_hf_checkpoint(hf_ckpt, monkeypatch, capsys, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    args = ["validate", "--checkpoint", str(hf_ckpt), "--reference", "hf", "--prompts", str(prompts)]
    code, out, err = run_cli([*args, "--max-bytes", "8", "--threads", "1"], monkeypatch, capsys)
    assert code == 0, out + err
    assert "hf vs torch  hf/logits" in out and "hf vs torch  hf/greedy" in out and "PASS" in out


def test_reference_hf_refuses_the_options_of_the_torch_reference(hf_ckpt, monkeypatch, capsys, tmp_path):
    """--reference hf compares torch with transformers only: --backends ort,trt --artifacts DIR with
    it used to PASS without running ort or trt. Exit 2 naming the options, before any work; so from
    the environment, and from the API."""
    from fastblt.errors import InputError
    from fastblt.validate.run import ValidateOptions

    args = ["validate", "--checkpoint", str(hf_ckpt), "--reference", "hf"]
    code, out, err = run_cli([*args, "--backends", "ort,trt", "--artifacts", str(tmp_path)], monkeypatch, capsys)
    assert code == 2 and out == "" and "PASS" not in err, err
    line = next(line for line in err.splitlines() if line.startswith("Error:"))
    assert "--reference hf" in line and "--artifacts, --backends are for --reference torch" in line
    monkeypatch.setenv("FASTBLT_VALIDATE_BACKENDS", "ort")
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "--backends is for --reference torch" in err, err
    with pytest.raises(InputError, match="--artifacts, --backends are for --reference torch"):
        ValidateOptions(checkpoint=hf_ckpt, reference="hf", artifacts=tmp_path, backends=("ort",))


def test_reference_hf_fails_when_the_hf_side_is_perturbed(hf_ckpt):
    from fastblt.validate.hf import hf_model, hf_parity

    model = load_checkpoint(hf_ckpt)
    hf = hf_model(model, hf_ckpt)
    assert hf_parity(model, hf, [PROMPT], greedy_bytes=4)
    with torch.no_grad():
        hf.model.local_decoder.layers[0].mlp.gate_proj.weight[0, 0] += 0.5  # the HF side only
    report = hf_parity(model, hf, [PROMPT], greedy_bytes=4)
    assert not report
    failed = [line for line in report.failures() if "hf/logits" in line]
    assert failed and all("max_abs" in line for line in failed)


def test_meta_and_fastblt_formats_are_converted_for_hf(tmp_path):
    from fastblt.validate.hf import hf_model, hf_parity

    model = make_model("small-window", blt_d=True)  # max_patch_length: HF's own patcher is skipped
    save_checkpoint(model, tmp_path / "meta", fmt="meta-hub")
    loaded = load_checkpoint(tmp_path / "meta")
    report = hf_parity(loaded, hf_model(loaded, tmp_path / "meta"), [PROMPT], greedy_bytes=4)
    assert report and [s.what for s in report.skipped] == ["hf patcher"]


def test_decoder_input_norm_is_attached_to_the_hf_side():
    from fastblt.validate.hf import hf_model, hf_parity

    model = make_model("hf-test-sizes", blt_d=False, decoder_input_norm=True)
    hf = hf_model(model)
    report = hf_parity(model, hf, [PROMPT], greedy_bytes=4)
    assert report and all("decoder input norm" in case for *_, case, _ in report.entries())
    hf.model.local_decoder._forward_pre_hooks.clear()  # the released layout: no norm
    assert not hf_parity(model, hf, [PROMPT], greedy_bytes=4)


def test_transformers_is_quiet_inside_and_as_it_was_after():
    """No warnings and no progress bar (from_pretrained's "Loading weights") on validate's
    stderr; the caller's settings come back after."""
    from transformers.utils import logging as hf_logging

    from fastblt.validate.hf import quiet_transformers

    before = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with quiet_transformers():
        assert hf_logging.get_verbosity() == hf_logging.ERROR and not hf_logging.is_progress_bar_enabled()
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before
