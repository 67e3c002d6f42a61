"""Optimization profiles derived from an export manifest (pure logic, no TensorRT)."""

from __future__ import annotations

import dataclasses

import pytest
from trt_fakes import write_fake_export

from fastblt.engines.trt.profiles import (
    TYPICAL_PAST,
    DimRange,
    Profile,
    graph_inputs,
    manifest_profiles,
    named_sizes,
    parse_profile_option,
    select_profile,
)
from fastblt.errors import InputError, ManifestMismatch
from fastblt.export.spec import PAST_BUCKET
from fastblt.model.config import tiny_config

MAX_STEP = 32
RING = 512 + MAX_STEP  # tiny_config's windowed stacks: window 512 + max_step slots
PAST = 4096  # tiny_config's global model: 4096 positions (a multiple of PAST_BUCKET)
LONGEST = 4096  # no max_patch_length: a patch is at most the encoder's 4096 positions


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    return write_fake_export(out, tiny_config(blt_d=True), max_step=MAX_STEP, max_batch=2)[0]


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
    # byte steps: decode S=1, block S<=B=4, verify S<=k+1=17, prefill S<=max_step 32; batch 1..1
    dec = by_name(profiles["decoder"])
    assert list(dec) == ["decode", "block", "verify", "prefill"]  # smallest first
    assert dec["decode"] == {"batch": [1, 1, 1], "new": [1, 1, 1]}
    assert dec["block"]["new"] == [1, 4, 4]
    assert dec["verify"]["new"] == [1, 17, 17]
    assert dec["prefill"]["new"] == [1, 32, 32]  # the default: the export's max_step
    # the diffusion head only runs blocks
    assert by_name(profiles["decoder_block"]) == {"block": {"batch": [1, 1, 1], "new": [1, 4, 4]}}
    # the global step: S new bytes close <= S patches; patch_len up to the export's bound; its
    # linear cache's `past` slots up to the global model's position limit, in every phase
    glob = by_name(profiles["global"])
    past = [1, TYPICAL_PAST, PAST]
    assert glob["decode"] == {"batch": [1, 1, 1], "patches": [1, 1, 1], "patch_len": [1, 8, LONGEST], "past": past}
    assert glob["verify"]["patches"] == [1, 5, 17]  # opt: 17 bytes / 4 per typical patch
    assert glob["prefill"]["patches"] == [1, 8, 32]
    assert {p["past"] == past for p in glob.values()} == {True}
    # the windowed stacks' rings are static: no step but the global one has a `past` dim
    assert all("past" not in d for step in profiles if step != "global" for d in by_name(profiles[step]).values())
    for ps in profiles.values():  # TensorRT needs min >= 1 everywhere
        for p in ps:
            assert all(r.min >= 1 for r in p.dims.values())


def test_profile_shapes_keep_static_rings_and_range_the_global_cache(manifest):
    p = next(p for p in manifest_profiles(manifest, {"prefill": 16})["decoder"] if p.name == "prefill")
    inputs = {t.name: t for t in graph_inputs(manifest, "decoder")}
    lo, opt, hi = p.shapes(inputs["past.0.k"])
    assert lo == opt == hi == (1, 2, RING, 8)  # the ring of window + max_step slots is fixed
    assert p.shapes(inputs["cross.0.k"]) == ((1, 1, MAX_STEP + 2, 32),) * 3  # the cross ring too
    assert p.shapes(inputs["h"]) == ((1, 1, 16), (1, 16, 16), (1, 16, 16))
    # the global step's linear cache: from one slot to the global model's position limit
    for g in manifest_profiles(manifest, {"prefill": 16})["global"]:
        inputs = {t.name: t for t in graph_inputs(manifest, "global")}
        assert g.shapes(inputs["past.0.k"]) == ((1, 2, 1, 16), (1, 2, TYPICAL_PAST, 16), (1, 2, PAST, 16))
        assert g.shapes(inputs["cross.0.k"]) == ((1, 1, MAX_STEP + 2, 32),) * 3


@pytest.mark.parametrize(("positions", "past_max"), [(1000, 1024), (4096, 4096), (300, 320)])
def test_past_reaches_the_global_position_limit_rounded_to_a_bucket(tmp_path, positions, past_max):
    """The export's `past` range is the global model's position limit rounded up to PAST_BUCKET;
    every profile admits all of it (opt: TYPICAL_PAST, or the whole range when it is shorter)."""
    config = tiny_config(blt_d=True)
    config = dataclasses.replace(config, global_model=dataclasses.replace(config.global_model, max_positions=positions))
    manifest = write_fake_export(tmp_path, config, max_step=MAX_STEP)[0]
    assert manifest["dims"]["past"] == {"min": 1, "max": past_max} and past_max % PAST_BUCKET == 0
    for p in manifest_profiles(manifest)["global"]:
        assert p.to_dict()["dims"]["past"] == [1, min(TYPICAL_PAST, past_max), past_max]
        assert p.contains({"batch": 1, "past": past_max}) and not p.contains({"batch": 1, "past": past_max + 1})


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
        ({"patch_len": LONGEST + 1}, 1, f"patch_len={LONGEST + 1}: exceeds the export's max patch length"),
        ({}, 3, "--max-batch 3: the export admits batch 1..2"),
    ],
)
def test_sizes_the_export_cannot_take_are_errors(manifest, requested, max_batch, match):
    with pytest.raises(InputError, match=match):
        manifest_profiles(manifest, requested, max_batch)


def test_plain_blt_has_no_block_profile(tmp_path):
    manifest = write_fake_export(tmp_path, tiny_config(blt_d=False), max_step=16)[0]
    profiles = manifest_profiles(manifest)
    assert "decoder_block" not in profiles
    # verify (k+1 = 17, clamped to the export's max_step 16) and prefill coincide: one profile
    assert [p.name for p in profiles["encoder"]] == ["decode", "verify+prefill"]
    with pytest.raises(InputError, match="no diffusion head"):
        manifest_profiles(manifest, {"block": 4})


def test_manifest_without_dims_is_refused(manifest):
    with pytest.raises(ManifestMismatch, match="field dims"):
        manifest_profiles({**manifest, "dims": {}})
    no_past = {d: r for d, r in manifest["dims"].items() if d != "past"}  # as a format-1 export had them
    with pytest.raises(ManifestMismatch, match=r"field dims: expected \[.*'past'\]"):
        manifest_profiles({**manifest, "dims": no_past})


def test_select_profile_picks_the_smallest_containing_one(manifest):
    profiles = manifest_profiles(manifest)["decoder"]
    names = [p.name for p in profiles]
    assert names[select_profile("decoder", profiles, {"batch": 1, "new": 1})] == "decode"
    assert names[select_profile("decoder", profiles, {"batch": 1, "new": 3})] == "block"
    assert names[select_profile("decoder", profiles, {"batch": 1, "new": 7})] == "verify"
    assert names[select_profile("decoder", profiles, {"batch": 1, "new": 20})] == "prefill"
    with pytest.raises(InputError, match=r"step decoder: sizes \{'batch': 1, 'new': 33\} fit none"):
        select_profile("decoder", profiles, {"batch": 1, "new": 33})
    # the global step: any `past` up to the position limit fits every phase; patches pick the phase
    glob = manifest_profiles(manifest)["global"]
    names = [p.name for p in glob]
    sizes = {"batch": 1, "patches": 1, "patch_len": 3}
    assert names[select_profile("global", glob, {**sizes, "past": PAST})] == "decode"
    assert names[select_profile("global", glob, {**sizes, "patches": 20, "past": 64})] == "prefill"
    with pytest.raises(InputError, match=f"step global: sizes .*'past': {PAST + PAST_BUCKET}.* fit none"):
        select_profile("global", glob, {**sizes, "past": PAST + PAST_BUCKET})


def test_named_sizes_reads_and_checks_the_feeds(manifest):
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


def test_sizes_at_the_exports_maximum_are_accepted(manifest):
    """The export's max_step and max_batch are inclusive bounds: asking for exactly them builds
    (a user who passes --profile prefill=<max_step> gets that profile, not an error)."""
    profiles = manifest_profiles(manifest, {"prefill": MAX_STEP, "verify": MAX_STEP}, max_batch=2)
    dec = by_name(profiles["decoder"])  # verify and prefill now have the same ranges: one profile
    assert dec["verify+prefill"]["new"] == [1, MAX_STEP, MAX_STEP] and dec["decode"]["batch"] == [1, 1, 2]
    with pytest.raises(InputError, match=f"--profile prefill={MAX_STEP + 1}: exceeds"):
        manifest_profiles(manifest, {"prefill": MAX_STEP + 1})
