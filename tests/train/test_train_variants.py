"""benchmarks/train_variants.py: each variant changes only what it says; bad names are refused."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from click.testing import CliRunner

from fastblt.train.loop import default_plan

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "train_variants.py"
_spec = importlib.util.spec_from_file_location("train_variants", _PATH)
tv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tv)


def _diff(a, b, prefix=""):
    """Dotted names of the fields where two (nested) dataclasses differ."""
    out = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x) and dataclasses.is_dataclass(y):
            out += _diff(x, y, f"{prefix}{f.name}.")
        elif x != y:
            out.append(f"{prefix}{f.name}")
    return out


def test_each_variant_changes_only_what_it_says():
    base = default_plan(20, 0, 20)
    want = {
        "default": [],
        "baseline": [],
        "recipe-2026-11": ["blt.lr", "model.hash_vocab"],
        "hash2048": ["model.hash_vocab"],
        "dec4": ["model.global_model.n_layers", "model.decoder.n_layers"],
        "lr3e-3": ["blt.lr"],
        "lr8e-3": ["blt.lr"],
        "mask0.1": ["blt.mask_weight"],
        "baseline-lr1.5e-3": ["base.lr"],
        "baseline-lr5e-3": ["base.lr"],
        "baseline-fp32": ["entropy.bf16", "blt.bf16", "base.bf16"],
        "fp32": ["entropy.bf16", "blt.bf16", "base.bf16"],
        "glr1": ["blt.global_lr_mult"],
        "glr0.1": ["blt.global_lr_mult"],
        "init-torch": ["blt.init"],
        "baseline-init": ["base.init"],
        **{f"win{w}": ["model.encoder.window", "model.decoder.window"] for w in (16, 32, 64, 512)},
        "local256": [
            *(f"model.{part}.{f}" for part in ("encoder", "decoder") for f in ("dim", "ffn_dim")),
            "model.global_model.n_layers",
            "model.hash_vocab",
        ],
        "hashdrop0.25": ["blt.hash_dropout"],
        "ngram3-5": ["model.hash_sizes"],
        "library-only": ["corpus_tests"],
        "no-decnorm": ["model.decoder_input_norm"],
    }
    assert set(want) == set(tv.VARIANTS)
    for name, (_, edit) in tv.VARIANTS.items():
        assert sorted(_diff(base, edit(default_plan(20, 0, 20)))) == sorted(want[name]), name


def test_window_variants_set_the_window_they_name():
    for w in (16, 32, 64, 512):
        plan = tv.VARIANTS[f"win{w}"][1](default_plan(20, 0, 20))
        assert (plan.model.encoder.window, plan.model.decoder.window) == (w, w)


def test_variants_combine_with_plus():
    what, edit = tv.variant("glr1+win512")
    plan = edit(default_plan(20, 0, 20))
    assert plan.blt.global_lr_mult == 1.0 and plan.model.decoder.window == 512
    assert what == f"{tv.VARIANTS['glr1'][0]}; {tv.VARIANTS['win512'][0]}"


def test_unknown_variant_is_a_usage_error_naming_it(tmp_path):
    res = CliRunner().invoke(tv.main, ["--variants", "default,nope", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "nope" in res.output
    for bad in ("glr1+nope", "glr1+baseline"):  # a baseline only as the first part
        res = CliRunner().invoke(tv.main, ["--variants", bad, "--out", str(tmp_path)])
        assert res.exit_code == 2 and bad in res.output


def test_the_table_states_each_rows_precision_where_recorded():
    row = {"variant": "default", "what": "the shipped recipe", "minutes": 1, "params": 10, "steps": 2}
    row |= {"train_bytes": 100, "bytes_per_s": 1.0, "heldout_bpb": 2.0, "code_bpb": 1.5}
    md = tv.render([row, row | {"bf16": False}, row | {"bf16": True}])
    rates = [line.split(" | ")[8] for line in md.splitlines() if line.startswith("|  | 1 | default")]
    assert rates == ["", "fp32", "bf16"]  # rows from before 2026-12-03 did not record it


def test_the_table_states_each_rows_held_out_list_size():
    row = {"variant": "default", "what": "the shipped recipe", "minutes": 1, "params": 10, "steps": 2}
    row |= {"train_bytes": 100, "bytes_per_s": 1.0, "heldout_bpb": 2.0, "code_bpb": 1.5}
    md = tv.render([row, row | {"heldout_files": 100}])
    sizes = [line.split(" | ")[9] for line in md.splitlines() if line.startswith("|  | 1 | default")]
    assert sizes == ["18", "100"]  # rows from before the list grew did not record it: they used 18 files
