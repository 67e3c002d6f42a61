"""Optimization profiles derived from an export manifest (pure logic, no TensorRT)."""

from __future__ import annotations

import pytest
from trt_fakes import write_fake_export

from fastblt.engines.trt.profiles import (
    DimRange,
    Profile,
    manifest_profiles,
    named_sizes,
    parse_profile_option,
    select_profile,
)
from fastblt.errors import InputError, ManifestMismatch
from fastblt.model.config import tiny_config


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    return write_fake_export(out, tiny_config(blt_d=True), capacity=32, max_batch=2)[0]


def by_name(profiles):
    return {p.name: p.to_dict()["dims"] for p in profiles}


def test_parse_profile_option():
    assert parse_profile_option("prefill=256, decode=1,verify=9") == {"prefill": 256, "decode": 1, "verify": 9}
    assert parse_profile_option(None) == {} == parse_profile_option("")
    for bad in ("prefill", "prefil=3", "verify=x", "decode=0", "verify=2,verify=3"):
        with pytest.raises(InputError, match="--profile"):
            parse_profile_option(bad)


def test_default_profiles_per_step(manifest):
    profiles = manifest_profiles(manifest)
    assert set(profiles) == {"entropy", "encoder", "global", "decoder", "decoder_block"}
    # byte steps: decode S=1, block S<=B=4, verify S<=k+1=9, prefill S<=min(512, capacity 32); batch 1..1
    dec = by_name(profiles["decoder"])
    assert list(dec) == ["decode", "block", "verify", "prefill"]  # smallest first
    assert dec["decode"] == {"batch": [1, 1, 1], "new": [1, 1, 1]}
    assert dec["block"]["new"] == [1, 4, 4]
    assert dec["verify"]["new"] == [1, 9, 9]
    assert dec["prefill"]["new"] == [1, 32, 32]  # the default 512 is clamped to the cache capacity
    # the diffusion head only runs blocks
    assert by_name(profiles["decoder_block"]) == {"block": {"batch": [1, 1, 1], "new": [1, 4, 4]}}
    # the global step: S new bytes close <= S patches; patch_len up to the export's bound
    glob = by_name(profiles["global"])
    assert glob["decode"] == {"batch": [1, 1, 1], "patches": [1, 1, 1], "patch_len": [1, 8, 32]}
    assert glob["verify"]["patches"] == [1, 3, 9]
    assert glob["prefill"]["patches"] == [1, 8, 32]
    for ps in profiles.values():  # TensorRT needs min >= 1 everywhere
        for p in ps:
            assert all(r.min >= 1 for r in p.dims.values())


def test_profile_shapes_keep_static_cache_capacity(manifest):
    from fastblt.engines.trt.profiles import graph_inputs

    p = manifest_profiles(manifest, {"prefill": 16})["decoder"][-1]
    inputs = {t.name: t for t in graph_inputs(manifest, "decoder")}
    lo, opt, hi = p.shapes(inputs["past.0.k"])
    assert lo == (1, 2, 32, 8) and opt == (1, 2, 32, 8) and hi == (1, 2, 32, 8)  # capacity 32 is fixed
    assert p.shapes(inputs["h"]) == ((1, 1, 16), (1, 16, 16), (1, 16, 16))


def test_requested_sizes_and_batch(manifest):
    profiles = manifest_profiles(manifest, {"prefill": 16, "verify": 4, "patch_len": 6}, max_batch=2)
    dec = by_name(profiles["decoder"])
    assert dec["prefill"]["new"] == [1, 16, 16] and dec["prefill"]["batch"] == [1, 1, 2]
    # verify S<=4 and block S<=4 have identical ranges: one profile serves both
    assert "verify+block" in dec and dec["verify+block"]["new"] == [1, 4, 4]
    assert by_name(profiles["global"])["decode"]["patch_len"] == [1, 6, 6]


@pytest.mark.parametrize(
    ("requested", "max_batch", "match"),
    [
        ({"prefill": 64}, 1, "prefill=64: exceeds the export's max new positions"),
        ({"patch_len": 33}, 1, "patch_len=33: exceeds"),
        ({}, 3, "--max-batch 3: the export admits batch 1..2"),
    ],
)
def test_sizes_the_export_cannot_take_are_errors(manifest, requested, max_batch, match):
    with pytest.raises(InputError, match=match):
        manifest_profiles(manifest, requested, max_batch)


def test_plain_blt_has_no_block_profile(tmp_path):
    manifest = write_fake_export(tmp_path, tiny_config(blt_d=False), capacity=16)[0]
    profiles = manifest_profiles(manifest)
    assert "decoder_block" not in profiles
    assert [p.name for p in profiles["encoder"]] == ["decode", "verify", "prefill"]
    with pytest.raises(InputError, match="no diffusion head"):
        manifest_profiles(manifest, {"block": 4})


def test_manifest_without_dims_is_refused(manifest):
    with pytest.raises(ManifestMismatch, match="field dims"):
        manifest_profiles({**manifest, "dims": {}})


def test_select_profile_picks_the_smallest_containing_one(manifest):
    profiles = manifest_profiles(manifest)["decoder"]
    names = [p.name for p in profiles]
    assert names[select_profile("decoder", profiles, {"batch": 1, "new": 1})] == "decode"
    assert names[select_profile("decoder", profiles, {"batch": 1, "new": 3})] == "block"
    assert names[select_profile("decoder", profiles, {"batch": 1, "new": 7})] == "verify"
    assert names[select_profile("decoder", profiles, {"batch": 1, "new": 20})] == "prefill"
    with pytest.raises(InputError, match=r"step decoder: sizes \{'batch': 1, 'new': 33\} fit none"):
        select_profile("decoder", profiles, {"batch": 1, "new": 33})


def test_named_sizes_reads_and_checks_the_feeds(manifest):
    from fastblt.engines.trt.profiles import graph_inputs

    inputs = graph_inputs(manifest, "decoder_block")
    shapes = {t.name: [1 if d == "batch" else 4 if d == "new" else d for d in t.shape] for t in inputs}
    assert named_sizes("decoder_block", inputs, shapes) == {"batch": 1, "new": 4}
    shapes["start"] = [2]
    with pytest.raises(InputError, match="input start: dim batch is 2, but another input has batch = 1"):
        named_sizes("decoder_block", inputs, shapes)


def test_profile_round_trip_and_range_checks():
    p = Profile("verify", {"batch": DimRange(1, 1, 2), "new": DimRange(1, 9, 9)})
    assert Profile.from_dict(p.to_dict()) == p
    assert p.contains({"batch": 2, "new": 9}) and not p.contains({"batch": 1, "new": 10})
    with pytest.raises(InputError, match="1 <= min <= opt <= max"):
        DimRange(0, 1, 1)
