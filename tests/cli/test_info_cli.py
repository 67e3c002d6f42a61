"""`fastblt info`: the checkpoint's capabilities and, per backend, whether it runs here and where."""

from __future__ import annotations

import json

import torch

from tiny import run_cli


def test_info_json_names_modes_params_and_each_backend(monkeypatch, capsys):
    code, out, _ = run_cli(["info", "--json"], monkeypatch, capsys)
    assert code == 0
    info = json.loads(out)
    assert info["modes"] == ["ar", "blt-s", "blt-d", "blt-dv"] and info["block_size"] == 8
    assert set(info["backends"]) == {"torch", "ort", "trt"}
    torch_line = info["backends"]["torch"]["reason"]
    assert info["backends"]["torch"]["available"] and "cpu eager" in torch_line
    assert ("CUDA graphs" in torch_line) == torch.cuda.is_available()


def test_info_text_has_one_line_per_backend(monkeypatch, capsys):
    code, out, _ = run_cli(["info"], monkeypatch, capsys)
    assert code == 0
    assert sorted(line.split()[1] for line in out.splitlines() if line.startswith("backend ")) == [
        "ort",
        "torch",
        "trt",
    ]
