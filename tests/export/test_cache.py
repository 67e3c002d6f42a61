"""The export cache: the hash an in-memory model is keyed by, cached_export leaving the caller's
model alone, and where the cache lives ($FASTBLT_CACHE only when no directory is given)."""

from __future__ import annotations

import copy

import torch

from fastblt.export.cache import CACHE_ENV, cache_root, cached_export, model_hash
from fastblt.export.manifest import read_manifest
from fastblt.export.options import ExportOptions

from export_helpers import MAX_STEP


def test_model_hash_changes_when_weights_swap_places(ref_model):
    """Two models with the same config and the same set of tensors, two of them swapped between
    layers, compute different things: they must not share a cache entry (one hash)."""
    swapped = copy.deepcopy(ref_model)
    a, b = swapped.local_decoder.layers[0].attention.wq, swapped.local_decoder.layers[1].attention.wq
    assert a.weight.shape == b.weight.shape and not torch.equal(a.weight, b.weight)
    with torch.no_grad():
        wa = a.weight.clone()
        a.weight.copy_(b.weight)
        b.weight.copy_(wa)
    assert model_hash(copy.deepcopy(ref_model)) == model_hash(ref_model)  # a copy is the same model
    assert model_hash(swapped) != model_hash(ref_model)


def test_cached_export_casts_a_copy_not_the_callers_model(ref_model, tmp_path):
    """An fp16 cached export of an fp32 model exports fp16 graphs without changing the caller's
    model: it keeps running (and hashing) in float32 afterwards."""
    model = copy.deepcopy(ref_model)
    key = model_hash(model)
    out = cached_export(model, key, ExportOptions(dtype="fp16", max_step=MAX_STEP), "in-memory model", tmp_path)
    assert read_manifest(out)["options"]["dtype"] == "float16"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model_hash(model) == key


def test_an_explicit_cache_dir_wins_over_the_environment(tmp_path, monkeypatch):
    """$FASTBLT_CACHE is the default for callers that name no directory; a directory passed in
    (e.g. --cache-dir) must be used even when the variable is set."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_root(tmp_path / "mine") == tmp_path / "mine"
    assert cache_root() == tmp_path / "env"
