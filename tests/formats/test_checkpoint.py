"""Checkpoint formats: round trips, parity with transformers, and every bad input named."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

from fastblt.errors import CheckpointError, ConfigError, FastBltError
from fastblt.formats import checkpoint as ckpt_mod
from fastblt.formats.checkpoint import (
    FORMATS,
    checkpoint_hash,
    convert,
    detect_format,
    load_checkpoint,
    load_config,
    load_mapped,
    resolve_checkpoint_path,
    save_checkpoint,
)
from fastblt.formats.meta import config_to_meta
from fastblt.model.blt import BltModel
from fastblt.model.config import blt_1b_config, tiny_config

from tiny import run_cli

TOKENS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 100, 101, 4, 5, 6, 200, 201, 202]])
PATCHES = torch.tensor([[1, 3, 2, 3], [1, 1, 4, 3]])  # explicit multi-byte patches


def make_model(blt_d: bool = True, seed: int = 0, **kw) -> BltModel:
    torch.manual_seed(seed)
    model = BltModel(tiny_config(blt_d=blt_d, **kw)).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: randomize everything so no tensor can be mixed up unseen
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def assert_same_model(a: BltModel, b: BltModel) -> None:
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a(TOKENS, PATCHES), b(TOKENS, PATCHES))


def saved(tmp_path: Path, fmt: str = "fastblt", model: BltModel | None = None, name: str = "ckpt") -> Path:
    return save_checkpoint(model or make_model(), tmp_path / name, fmt)


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", ["blt-d", "blt+projection"])
def test_round_trip(tmp_path: Path, fmt: str, variant: str) -> None:
    model = make_model() if variant == "blt-d" else make_model(blt_d=False, d_global=48, k=4)
    out = save_checkpoint(model, tmp_path / "ckpt", fmt)
    assert detect_format(out) == fmt
    loaded = load_checkpoint(out)
    assert not loaded.training
    assert_same_model(model, loaded)
    assert load_config(out) == model.config


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_without_entropy_model(tmp_path: Path, fmt: str) -> None:
    torch.manual_seed(0)
    model = BltModel(tiny_config().replace(entropy=None, blt_d=None)).eval()
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "ckpt", fmt))
    assert loaded.config.entropy is None and loaded.entropy_model is None
    assert_same_model(model, loaded)


@pytest.mark.parametrize("fmt", ["meta-dump", "meta-hub"])
def test_meta_round_trip_of_a_config_meta_args_cannot_express(tmp_path: Path, fmt: str) -> None:
    """Per-stack theta/eps/window/FFN and per-side cross-attention heads survive via fastblt_overrides."""
    cfg = tiny_config()
    cfg = cfg.replace(
        global_model=dataclasses.replace(cfg.global_model, rope_theta=1e4, window=64, ffn_dim=40, norm_eps=1e-6),
        decoder=dataclasses.replace(cfg.decoder, max_positions=2048),
        entropy=dataclasses.replace(cfg.entropy, ffn_dim=24),
        cross_attn_heads_decoder=1,
    )
    torch.manual_seed(0)
    model = BltModel(cfg).eval()
    out = save_checkpoint(model, tmp_path / "ckpt", fmt)
    overrides = json.loads((out / ("params.json" if fmt == "meta-dump" else "config.json")).read_text())
    # multiple_of/ffn_dim_multiplier fit the local stacks and the entropy model; only the global FFN is overridden
    assert overrides["fastblt_overrides"] == {
        "global_model": {"ffn_dim": 40, "rope_theta": 1e4, "norm_eps": 1e-6, "window": 64},
        "decoder": {"max_positions": 2048},
        "cross_attn_heads_decoder": 1,
    }
    assert_same_model(model, load_checkpoint(out))


def test_hf_refuses_a_config_it_cannot_express(tmp_path: Path) -> None:
    model = BltModel(tiny_config().replace(cross_attn_heads_decoder=1))
    with pytest.raises(ConfigError, match="the HF format uses the local head count for cross-attention"):
        save_checkpoint(model, tmp_path / "ckpt", "hf")
    assert list(tmp_path.iterdir()) == []


def test_decoder_input_norm_round_trips_in_our_format_only(tmp_path: Path) -> None:
    model = make_model(decoder_input_norm=True)
    assert_same_model(model, load_checkpoint(saved(tmp_path, model=model)))
    for fmt in ("hf", "meta-dump", "meta-hub"):
        with pytest.raises(CheckpointError, match=f"format '{fmt}': config field decoder_input_norm"):
            save_checkpoint(model, tmp_path / fmt, fmt)
        assert not (tmp_path / fmt).exists()


def test_blt_checkpoint_loads_without_blt_d(tmp_path: Path) -> None:
    loaded = load_checkpoint(saved(tmp_path, model=make_model(blt_d=False)))
    assert loaded.config.blt_d is None and loaded.local_decoder.diffusion_embeddings is None


def test_blt_1b_meta_args_need_no_extensions() -> None:
    """A released config is expressible in Meta's own args: no fastblt_* keys are written."""
    args = config_to_meta(blt_1b_config())
    assert args.extras == {}
    m = args.model
    assert (m["dim_local_encoder"], m["n_layers_global"], m["n_layers_local_decoder"]) == (1024, 25, 9)
    assert (m["multiple_of"], m["ffn_dim_multiplier"], m["cross_attn_k"], m["cross_attn_nheads"]) == (256, 1.0, 2, 16)
    assert (m["max_encoder_seq_length"], m["max_seqlen"], m["local_attention_window_len"]) == (24576, 4096, 512)
    assert args.entropy is not None and (args.entropy["dim"], args.entropy["n_layers"]) == (768, 14)


def test_meta_hub_nested_args_layout(tmp_path: Path) -> None:
    """config.json {"args": {"model", "entropy_model", "data"}} (TrainArgs-shaped) reads the same."""
    model = make_model()
    out = saved(tmp_path, "meta-hub", model)
    train_args = json.loads((out / "train_args.json").read_text())
    (out / "train_args.json").unlink()
    (out / "config.json").write_text(json.dumps({"args": train_args}))
    assert_same_model(model, load_checkpoint(out))


def test_meta_dump_finds_sibling_entropy_model(tmp_path: Path) -> None:
    """Meta's download script puts entropy_model/ next to blt_1b/, not inside it."""
    model = make_model()
    out = saved(tmp_path, "meta-dump", model, name="blt_1b")
    (out / "entropy_model").rename(tmp_path / "entropy_model")
    assert_same_model(model, load_checkpoint(out))


# ------------------------------------------------------------------------------ Hugging Face
def test_hf_matches_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = make_model(blt_d=False)
    hf = transformers.BltForCausalLM.from_pretrained(saved(tmp_path, "hf", model)).eval()
    with torch.no_grad():
        theirs = hf(input_ids=TOKENS, patch_lengths=PATCHES, use_cache=False).logits
        ours = model(TOKENS, PATCHES)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_reads_sharded_checkpoint_written_by_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = make_model(blt_d=False)
    hf = transformers.BltForCausalLM.from_pretrained(saved(tmp_path, "hf", model))
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_same_model(model, load_checkpoint(tmp_path / "sharded"))


def test_hf_patch_in_forward_false_means_no_entropy_model(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model = make_model(blt_d=False)
    hf_config = transformers.BltConfig(**{**ckpt_mod.keymap.config_to_hf(model.config), "patch_in_forward": False})
    transformers.BltForCausalLM(hf_config).save_pretrained(tmp_path / "nopatcher")
    assert load_config(tmp_path / "nopatcher").entropy is None
    assert load_checkpoint(tmp_path / "nopatcher").entropy_model is None


def test_meta_hub_round_trip_matches_hf(tmp_path: Path) -> None:
    """The Meta-format round trip: Meta-hub -> ours equals the same weights through the HF format."""
    model = make_model(blt_d=False)
    via_hf = load_checkpoint(saved(tmp_path, "hf", model, name="hf"))
    via_meta = load_checkpoint(saved(tmp_path, "meta-hub", model, name="meta"))
    assert_same_model(via_hf, via_meta)
    converted = convert(tmp_path / "meta", "hf", tmp_path / "meta2hf")
    assert checkpoint_hash(converted) == checkpoint_hash(tmp_path / "hf")


# ------------------------------------------------------------------------------ dtypes, convert, hash
def test_bf16_weights_load_and_cast(tmp_path: Path) -> None:
    model = make_model()
    out = save_checkpoint(model, tmp_path / "bf16", "meta-hub", dtype=torch.bfloat16)
    stored = safetensors.torch.load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    fp32 = load_checkpoint(out)
    ref = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    assert all(v.dtype == torch.float32 and torch.equal(v, ref[k]) for k, v in fp32.state_dict().items())
    bf16 = load_checkpoint(out, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in bf16.state_dict().values())


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_convert_chain_keeps_weights(tmp_path: Path, dtype: torch.dtype | None) -> None:
    model = make_model()
    src = save_checkpoint(model, tmp_path / "src", "fastblt", dtype=torch.bfloat16)
    for fmt in ("hf", "meta-dump", "meta-hub", "fastblt"):
        src = convert(src, fmt, tmp_path / f"{fmt}-out", dtype=dtype)
        assert detect_format(src) == fmt
    want = dtype or torch.bfloat16  # convert keeps the source dtype unless told otherwise
    final = load_checkpoint(src, dtype=want)
    ref = {k: v.to(torch.bfloat16).to(want) for k, v in model.state_dict().items()}
    assert all(torch.equal(v, ref[k]) for k, v in final.state_dict().items())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_convert_and_export_never_replace_their_source(tmp_path: Path, where: str, monkeypatch, capsys) -> None:
    """An output that is the source checkpoint, holds it, or lies inside it (where --force would
    replace it whole, taking the source along) is refused before anything is written."""
    src = saved(tmp_path / "par", "meta-hub")  # a layout with a subdirectory (entropy_model/)
    out = {"same": src, "parent": src.parent, "inside": src / "entropy_model"}[where]
    before = _files(tmp_path)
    with pytest.raises(FastBltError, match=r"(is|holds|is inside) the source checkpoint"):
        convert(src, "hf", out, overwrite=True)
    for args in (["convert", str(src), "--to", "hf", "--out", str(out), "--force"],
                 ["export", "--checkpoint", str(src), "--out", str(out), "--force"]):  # fmt: skip
        code, _, err = run_cli(args, monkeypatch, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert re.search(r"(is|holds|is inside) the (source )?checkpoint", err), err
    assert _files(tmp_path) == before


def test_checkpoint_hash_is_stable_and_sees_weights(tmp_path: Path) -> None:
    model = make_model()
    for fmt in FORMATS:
        a, b = save_checkpoint(model, tmp_path / f"{fmt}-a", fmt), save_checkpoint(model, tmp_path / f"{fmt}-b", fmt)
        assert checkpoint_hash(a) == checkpoint_hash(b)
    h = checkpoint_hash(tmp_path / "fastblt-a")
    with torch.no_grad():
        model.local_decoder.norm.weight[0] += 1.0
    assert checkpoint_hash(save_checkpoint(model, tmp_path / "changed", "fastblt")) != h


@pytest.mark.parametrize("fmt", ["meta-dump", "meta-hub"])
def test_checkpoint_hash_sees_the_meta_entropy_weights(tmp_path: Path, fmt: str) -> None:
    """The Meta layouts keep the entropy model in its own file: a change there patches the bytes
    differently, so exports and caches keyed by the hash must not take it for the same model."""
    model = make_model()
    h = checkpoint_hash(save_checkpoint(model, tmp_path / "a", fmt))
    with torch.no_grad():
        model.entropy_model.tok_embeddings.weight[0, 0] += 1.0
    changed = save_checkpoint(model, tmp_path / "b", fmt)
    assert (changed / "entropy_model" / "consolidated.pth").is_file()
    assert checkpoint_hash(changed) != h


def test_default_checkpoint_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckpt_mod, "ASSETS", tmp_path / "fastblt" / "assets")
    with pytest.raises(CheckpointError, match=r"not built yet \(fastblt/assets/default\); run `fastblt train`"):
        resolve_checkpoint_path("default")
    model = make_model()
    save_checkpoint(model, tmp_path / "fastblt" / "assets" / "default")
    assert resolve_checkpoint_path("default") == tmp_path / "fastblt" / "assets" / "default"
    assert_same_model(model, load_checkpoint("default"))
    assert resolve_checkpoint_path(tmp_path / "x") == tmp_path / "x"


def test_the_shipped_report_describes_the_shipped_checkpoint() -> None:
    # REPORT.md's numbers are only true of the weights they were measured on: a checkpoint copied
    # into fastblt/assets/default without its report (or the reverse) fails here
    shipped = resolve_checkpoint_path("default")
    report = json.loads((shipped / "report.json").read_text())
    assert report["checkpoint_hash"] == checkpoint_hash(shipped)
    assert f"`{report['checkpoint_hash']}`" in (shipped / "REPORT.md").read_text()


def test_the_shipped_report_is_complete() -> None:
    # what issue 4 asks the shipped report to hold: a full (not --smoke) run, the byte-LM baseline
    # trained for the same wall clock as entropy model + BLT-D, masked-byte accuracy next to AR at
    # several mask rates, and ten greedy samples in every mode
    report = json.loads((resolve_checkpoint_path("default") / "report.json").read_text())
    assert not report["smoke"]
    blt_d, base = report["blt_d"], report["baseline"]
    assert base is not None, "the shipped report has no baseline: run `fastblt train --phase baseline`"
    budget = report["entropy"]["wall_s"] + blt_d["wall_s"]
    assert abs(base["wall_s"] - budget) < 0.01 * budget
    assert 0 < blt_d["heldout_ar"]["bpb"] < 8 and 0 < base["heldout"]["bpb"] < 8
    accuracy = blt_d["masked_acc_inference_layout"]
    assert len(accuracy) >= 3 and "1.0" in accuracy
    assert all(row["cells"] > 0 and 0 <= row["masked_acc"] <= 1 for row in accuracy.values())
    assert len(blt_d["samples"]) == 10
    assert all({"ar", "blt-s", "blt-dv", "blt-d"} <= sample.keys() for sample in blt_d["samples"])


# ------------------------------------------------------------------------------ saving safely
def test_save_refuses_a_directory_with_other_files(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"ckpt: directory is not empty .*notes\.txt.*overwrite=True") as e:
        save_checkpoint(make_model(), out)
    assert "--force" not in str(e.value)  # an API caller has no such flag
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    save_checkpoint(make_model(), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or backup left


def test_save_refuses_a_different_checkpoint_but_accepts_the_same(tmp_path: Path) -> None:
    out = saved(tmp_path, model=make_model(seed=0))
    save_checkpoint(make_model(seed=0), out)  # identical files: nothing to do
    with pytest.raises(CheckpointError, match="holds a different checkpoint"):
        save_checkpoint(make_model(seed=1), out)
    assert_same_model(make_model(seed=0), load_checkpoint(out))


def test_failed_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(make_model(), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_final_rename_puts_the_old_checkpoint_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replacing a checkpoint moves the old one aside first: if moving the new one into place then
    fails, the old one is back where it was, not lost in a hidden directory."""
    old = make_model(seed=0)
    out = saved(tmp_path, model=old)
    real = Path.rename

    def rename(self, target):
        if Path(target) == out and self.name.startswith(".ckpt.tmp-"):
            raise OSError("rename failed")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(make_model(seed=1), out, overwrite=True)
    monkeypatch.undo()
    assert_same_model(old, load_checkpoint(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing left aside


def test_a_saved_checkpoint_is_world_readable(tmp_path: Path) -> None:
    """A checkpoint is an ordinary directory (0o755 under umask 022), not the private mode of the
    temporary directory it was written in: other users and services can read it."""
    umask = os.umask(0o022)
    try:
        out = saved(tmp_path)
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o755


def test_save_rejects_unknown_format_and_file_target(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="'gguf': expected one of fastblt, hf, meta-dump, meta-hub"):
        save_checkpoint(make_model(), tmp_path / "x", "gguf")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="file: exists and is not a directory"):
        save_checkpoint(make_model(), tmp_path / "file")


# ------------------------------------------------------------------------------ bad inputs
def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope: no such checkpoint directory"):
        load_checkpoint(tmp_path / "nope")


def test_single_file_path_is_named(tmp_path: Path) -> None:
    out = saved(tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: is a file; pass the checkpoint directory"):
        load_checkpoint(out / "model.safetensors")


def test_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match=r"not a BLT checkpoint: expected config\.json .*\['weights\.bin'\]"):
        detect_format(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"config\.json: not a BLT config"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("fmt", "victim"),
    [
        ("fastblt", "model.safetensors"),
        ("hf", "model.safetensors"),
        ("meta-dump", "consolidated.pth"),
        ("meta-hub", "model.safetensors"),
        ("meta-hub", "entropy_model/consolidated.pth"),
        ("meta-dump", "entropy_model/params.json"),
    ],
)
def test_missing_file_is_named(tmp_path: Path, fmt: str, victim: str) -> None:
    out = saved(tmp_path, fmt)
    (out / victim).unlink()
    with pytest.raises(CheckpointError, match=f"{victim}: file not found"):
        load_checkpoint(out)


@pytest.mark.parametrize(
    ("fmt", "victim", "kind"),
    [("fastblt", "model.safetensors", "safetensors"), ("meta-dump", "consolidated.pth", "torch")],
)
def test_truncated_weights(tmp_path: Path, fmt: str, victim: str, kind: str) -> None:
    out = saved(tmp_path, fmt)
    data = (out / victim).read_bytes()
    (out / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{victim}: cannot read {kind} file \\(") as err:
        load_checkpoint(out)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("fmt", "victim"), [("fastblt", "config.json"), ("meta-dump", "params.json")])
def test_corrupt_json(tmp_path: Path, fmt: str, victim: str) -> None:
    out = saved(tmp_path, fmt)
    (out / victim).write_text('{"format": "fastblt", ')
    with pytest.raises(CheckpointError, match=f"{victim}: cannot read JSON \\("):
        load_checkpoint(out)


def _edit_weights(out: Path, edit) -> None:
    state = safetensors.torch.load_file(str(out / "model.safetensors"))
    edit(state)
    safetensors.torch.save_file(state, str(out / "model.safetensors"))


def test_missing_tensor(tmp_path: Path) -> None:
    out = saved(tmp_path)
    _edit_weights(out, lambda s: s.pop("local_decoder.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) local_decoder\.norm\.weight \(1 in all\)"):
        load_checkpoint(out)


def test_blt_d_config_without_its_tensor(tmp_path: Path) -> None:
    out = saved(tmp_path, "hf")
    _edit_weights(out, lambda s: s.pop("model.local_decoder.diffusion_embeddings.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) local_decoder\.diffusion_embeddings\.weight"):
        load_checkpoint(out)


def test_extra_tensor(tmp_path: Path) -> None:
    out = saved(tmp_path)
    _edit_weights(out, lambda s: s.update({"local_decoder.bias": torch.zeros(3), "zz.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) local_decoder\.bias, zz\.weight \(2 in all\)"):
        load_checkpoint(out)


def test_wrong_shape(tmp_path: Path) -> None:
    out = saved(tmp_path)
    _edit_weights(out, lambda s: s.update({"local_encoder.tok_embeddings.weight": torch.zeros(260, 8)}))
    msg = (
        r"tensor local_encoder\.tok_embeddings\.weight: shape \(260, 8\) in the checkpoint, config expects \(260, 16\)$"
    )
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(out)


def test_wrong_fused_hash_table_shape(tmp_path: Path) -> None:
    out = saved(tmp_path, "hf")
    key = "model.encoder_hash_tok_embedding.weight"
    _edit_weights(out, lambda s: s.update({key: s[key][:100]}))
    with pytest.raises(CheckpointError, match=r"encoder_hash_tok_embedding\.weight: shape \(100, 16\) .*\(128, 16\)"):
        load_checkpoint(out)


def test_integer_tensor_is_refused(tmp_path: Path) -> None:
    out = saved(tmp_path)
    _edit_weights(out, lambda s: s.update({"local_decoder.norm.weight": torch.zeros(16, dtype=torch.int64)}))
    with pytest.raises(CheckpointError, match=r"tensor local_decoder\.norm\.weight: dtype torch\.int64"):
        load_checkpoint(out)


def test_missing_shard(tmp_path: Path) -> None:
    out = saved(tmp_path, "hf")
    index = {"weight_map": {"model.local_decoder.norm.weight": "model-00002-of-00002.safetensors"}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: file not found"):
        load_checkpoint(out)


def _edit_json(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize(
    ("fmt", "file", "edit", "field"),
    [
        ("fastblt", "config.json", lambda d: d["model"]["encoder"].update(n_layers=-1), "encoder.n_layers"),
        ("fastblt", "config.json", lambda d: d["model"]["decoder"].update(n_layers=True), "decoder.n_layers"),
        ("fastblt", "config.json", lambda d: d["model"]["global_model"].update(dim=250), "global_model.dim"),
        (
            "fastblt",
            "config.json",
            lambda d: d["model"].update(cross_attn_heads_encoder="4"),
            "cross_attn_heads_encoder: expected an int",
        ),
        ("fastblt", "config.json", lambda d: d["model"].update(hash_vocab=0), "hash_vocab"),
        ("hf", "config.json", lambda d: d["global_config"].update(num_hidden_layers=0), "n_layers"),
        ("hf", "config.json", lambda d: d.pop("encoder_config"), "encoder_config"),
        ("meta-dump", "params.json", lambda d: d["model"].update(n_layers_global=-2), "n_layers"),
        ("meta-dump", "params.json", lambda d: d["model"].pop("dim_local_encoder"), "dim_local_encoder"),
        ("meta-hub", "config.json", lambda d: d["args"].update(cross_attn_all_layers_encoder=True), "layers_encoder"),
        ("meta-hub", "config.json", lambda d: d["args"].update(n_kv_heads=1), "n_kv_heads"),
        ("meta-hub", "config.json", lambda d: d["fastblt_blt_d"].update(block_size=0), "blt_d.block_size"),
    ],
)
def test_config_field_errors_name_file_and_field(tmp_path: Path, fmt: str, file: str, edit, field: str) -> None:
    out = saved(tmp_path, fmt)
    _edit_json(out / file, edit)
    with pytest.raises(ConfigError, match=f"{file}: config field [a-z_.]*{field}"):
        load_checkpoint(out)


def test_fastblt_format_version(tmp_path: Path) -> None:
    out = saved(tmp_path)
    _edit_json(out / "config.json", lambda d: d.update(format_version=2))
    with pytest.raises(CheckpointError, match=r"config\.json: format_version 2 \(this fastblt reads 1\)"):
        load_checkpoint(out)


# ------------------------------------------------------------------------------ mapped reading (export)
@pytest.mark.parametrize("fmt", FORMATS)
def test_mapped_state_is_the_loaded_state(tmp_path: Path, fmt: str) -> None:
    out = saved(tmp_path, fmt)
    config, state = load_mapped(out)
    want = load_checkpoint(out).state_dict()
    assert config == load_config(out) and set(state) == set(want)
    assert all(torch.equal(state[k].float(), want[k]) for k in want)


def test_mapped_bf16_safetensors_keep_their_dtype(tmp_path: Path) -> None:
    out = save_checkpoint(make_model(), tmp_path / "ckpt", "fastblt", dtype=torch.bfloat16)
    _, state = load_mapped(out)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}  # cast later, one graph at a time


def test_mapped_reading_names_a_truncated_file(tmp_path: Path) -> None:
    out = saved(tmp_path)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: cannot map safetensors file \(tensor .* past the end"
    ):
        load_mapped(out)


def test_mapped_reading_checks_like_loading(tmp_path: Path) -> None:
    out = saved(tmp_path)
    _edit_weights(out, lambda s: s.pop("local_decoder.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) local_decoder\.norm\.weight \(1 in all\)"):
        load_mapped(out)


def test_replacing_a_file_with_a_directory_leaves_nothing_aside(tmp_path: Path) -> None:
    from fastblt.formats.files import replace_dir, staging_dir

    out = tmp_path / "out"
    out.write_text("an old file the caller was told to replace")
    tmp = staging_dir(out, "tmp")
    (tmp / "a.txt").write_text("new")
    replace_dir(tmp, out)
    assert (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_weight_that_is_not_finite_is_refused_where_it_is_read(tmp_path: Path, bad: float) -> None:
    """A damaged weight would make the model generate ids that are no bytes, silently."""
    model = make_model()
    with torch.no_grad():
        model.local_encoder.layers[0].attention.wq.weight[3, 5] = bad
    src = saved(tmp_path, model=model)
    for read in (load_checkpoint, load_mapped):
        with pytest.raises(CheckpointError, match=r"local_encoder\.layers\.0\.attention\.wq\.weight: 1 of \d+ values"):
            read(src)
