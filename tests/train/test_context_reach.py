"""benchmarks/context_reach.py: a cut window is the same model seeing less; "lost" is against the widest."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from fastblt.model.blt import EntropyModel
from fastblt.model.config import VOCAB_SIZE, StackConfig

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "context_reach.py"
_spec = importlib.util.spec_from_file_location("context_reach", _PATH)
cr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cr)


@pytest.fixture
def lm() -> EntropyModel:
    torch.manual_seed(0)
    cfg = StackConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=64, window=64, max_positions=256)
    return EntropyModel(cfg, VOCAB_SIZE).eval()


def test_cut_window_changes_only_positions_that_reach_past_it(lm):
    x = torch.randint(4, VOCAB_SIZE, (2, 40))
    with torch.no_grad():
        full, cut = lm(x), cr.with_window(lm, 16)(x)
    assert torch.equal(cut[:, :16], full[:, :16])  # nothing older than 16 bytes there to hide
    assert not torch.allclose(cut[:, 16:], full[:, 16:])
    assert cr.with_window(lm, 16).cfg.window == 16 and lm.cfg.window == 64  # the given model is untouched


def test_reach_rows_skip_windows_wider_than_trained_and_measure_loss_against_the_widest(lm):
    sets = {"heldout": torch.randint(4, VOCAB_SIZE, (2, 80)), "code": torch.randint(4, VOCAB_SIZE, (1, 80))}
    rows = cr.reach("tiny", lm, sets, cr.tqdm(disable=True))
    assert [r["window"] for r in rows] == [w for w in cr.WINDOWS if w <= 64]
    assert rows[0]["heldout_lost"] == 0.0
    for r in rows:
        assert r["heldout_lost"] == pytest.approx(r["heldout"] - rows[0]["heldout"])
    assert len({round(r["heldout"], 6) for r in rows}) == len(rows)  # each window is a different model
    md = cr.render(rows, prose=0.41)
    assert "| tiny | 16 |" in md and "(41% English prose" in md


def test_byte_lm_that_is_not_the_baseline_is_a_usage_error_naming_it(tmp_path):
    bad = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(2)}, str(bad))
    res = CliRunner().invoke(cr.main, ["--byte-lm", str(bad), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and str(bad) in res.output
