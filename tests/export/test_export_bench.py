"""benchmarks/export_bench.py: runs on the step contract's export API (a config and a weights
function, max_step), counts nodes in the file and after onnxruntime's optimizer, and compares
against the kept "before" results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fastblt.model.blt import BltModel
from fastblt.model.config import tiny_config

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("export_bench", ROOT / "benchmarks" / "export_bench.py")
eb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eb)


def test_random_weights_draw_every_parameter_on_demand_in_its_shape():
    config = tiny_config()
    draw, params = eb.random_weights(config, torch.float16)
    model = BltModel(config)
    assert params == sum(p.numel() for p in model.parameters())
    for name, p in model.named_parameters():
        t = draw(name)
        assert t.shape == p.shape and t.dtype == torch.float16 and t.device.type == "cpu", name
    norm = next(n for n, _ in model.named_parameters() if n.endswith("norm.weight"))
    assert bool((draw(norm) == 1).all())
    with pytest.raises(KeyError):
        draw("no.such.weight")


def test_tiny_run_counts_nodes_before_and_after_onnxruntimes_optimizer():
    r = eb.run("tiny", "fp32", 32, None, keep=False)
    assert r["max_step"] == 32 and r["dtype"] == "float32" and "capacity" not in r
    assert list(r["graphs"]) == ["entropy", "encoder", "global", "decoder", "decoder_block"]
    for step, g in r["graphs"].items():
        assert g["nodes"] == sum(g["op_counts"].values()) > 0, step
        assert 0 < g["ort_nodes"] <= g["nodes"] + 5, step
        assert set(g["checks"].values()) == {"pass"}, step
    before = json.loads((ROOT / "benchmarks" / "results" / "export_tiny_fp32.json").read_text())
    md = eb.markdown(r, before, "export_tiny_fp32.json")
    assert "| nodes after ORT opt. |" in md and "#### before / after" in md
    assert f"| entropy | {before['graphs']['entropy']['nodes']} | {r['graphs']['entropy']['nodes']} |" in md
    assert "nodes per byte" not in md  # random weights: no patching to speak of


def test_nodes_per_byte_counts_the_global_step_once_per_patch():
    before = {"entropy": 185, "encoder": 122, "global": 446, "decoder": 232, "decoder_block": 240}
    assert eb.nodes_per_byte(before, 4.3) == pytest.approx(185 + 122 + 232 + 446 / 4.3)
    assert eb.nodes_per_byte({**before, "global": None}, 4.3) is None
