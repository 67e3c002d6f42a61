"""Engine-cache keys and the engine-manifest check that guards every plan load (no TensorRT)."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
from trt_fakes import make_fake_trt

from fastblt.engines.trt.engine_cache import (
    EngineManifest,
    Machine,
    check_engine,
    engine_cache_key,
    manifest_path,
    plan_path,
    rebuild_hint,
    sha256_bytes,
    up_to_date,
    write_engine,
)
from fastblt.errors import ManifestMismatch

ONNX = {"decoder.onnx": "a" * 64}
MACHINE = Machine("10.16.1.11", "NVIDIA H100 80GB HBM3", "9.0")
PROFILES = [{"name": "decode", "dims": {"batch": [1, 1, 1], "new": [1, 1, 1]}}]
FLAGS = {"strongly_typed": True, "tf32": False, "precision_flags": [], "workspace_bytes": 1 << 30}
GRAPH = {"file": "decoder.onnx", "sha256": ONNX}
HINT = rebuild_hint("art")


def key(**change):
    args = dict(
        onnx_sha256=ONNX,
        trt_version=MACHINE.trt_version,
        gpu_name=MACHINE.gpu_name,
        compute_capability=MACHINE.compute_capability,
        profiles=PROFILES,
        build_flags=FLAGS,
    )
    return engine_cache_key(**{**args, **change})


def test_key_is_stable():
    assert key() == key()
    assert len(key()) == 64
    # dict order does not matter, values do
    assert key(build_flags=dict(reversed(list(FLAGS.items())))) == key()


@pytest.mark.parametrize(
    "change",
    [
        {"onnx_sha256": {"decoder.onnx": "b" * 64}},
        {"onnx_sha256": {**ONNX, "decoder.onnx.data": "c" * 64}},
        {"trt_version": "11.4.0.106"},
        {"gpu_name": "NVIDIA H200"},
        {"compute_capability": "8.9"},
        {"profiles": [{"name": "decode", "dims": {"batch": [1, 1, 2], "new": [1, 1, 1]}}]},
        {"profiles": [*PROFILES, {"name": "verify", "dims": {"batch": [1, 1, 1], "new": [1, 9, 9]}}]},
        # the global step's profiles range its linear cache: another `past` range is another engine
        {"profiles": [{"name": "decode", "dims": {**PROFILES[0]["dims"], "past": [1, 1024, 4096]}}]},
        {"build_flags": {**FLAGS, "workspace_bytes": 2 << 30}},
        {"build_flags": {**FLAGS, "tf32": True}},
    ],
)
def test_key_changes_with_every_field(change):
    assert key(**change) != key()


def write(tmp_path, plan=b"PLAN", **change):
    fields = dict(
        step="decoder",
        onnx_file="decoder.onnx",
        onnx_sha256=ONNX,
        **dataclasses.asdict(MACHINE),
        profiles=PROFILES,
        build_flags=FLAGS,
        cache_key=key(),
        plan_file="decoder.plan",
        plan_sha256=sha256_bytes(plan),
        plan_bytes=len(plan),
        build_seconds=1.0,
        fastblt_version="0.1.0",
    )
    fields.update(change)
    if any(k in change for k in ("onnx_sha256", "trt_version", "gpu_name", "compute_capability")):
        fields["cache_key"] = engine_cache_key(
            fields["onnx_sha256"],
            fields["trt_version"],
            fields["gpu_name"],
            fields["compute_capability"],
            fields["profiles"],
            fields["build_flags"],
        )
    write_engine(tmp_path, EngineManifest(**fields), plan)


def test_a_matching_engine_loads(tmp_path):
    write(tmp_path)
    m, data = check_engine(tmp_path, "decoder", GRAPH, MACHINE, HINT)
    assert data == b"PLAN" and m.cache_key == key()
    assert up_to_date(tmp_path, "decoder", key())
    assert not up_to_date(tmp_path, "decoder", key(trt_version="11.0.0"))


@pytest.mark.parametrize(
    ("change", "field", "source"),
    [
        ({"onnx_sha256": {"decoder.onnx": "b" * 64}}, "onnx_sha256", "the export manifest"),
        ({"trt_version": "10.8.0.43"}, "trt_version", "the running TensorRT"),
        ({"gpu_name": "NVIDIA A100-SXM4-80GB"}, "gpu_name", "this GPU"),
        ({"compute_capability": "8.0"}, "compute_capability", "this GPU"),
    ],
)
def test_a_foreign_engine_is_refused_naming_the_field(tmp_path, change, field, source):
    write(tmp_path, **change)
    with pytest.raises(ManifestMismatch) as e:
        check_engine(tmp_path, "decoder", GRAPH, MACHINE, HINT)
    msg = str(e.value)
    assert f"field {field} differs" in msg and source in msg
    assert "rebuild with: fastblt build --artifacts art" in msg


def test_a_plan_without_its_manifest_is_never_read(tmp_path):
    plan_path(tmp_path, "decoder").write_bytes(b"PLAN")
    with pytest.raises(ManifestMismatch, match="has no manifest decoder.engine.json; refusing to deserialize"):
        check_engine(tmp_path, "decoder", GRAPH, MACHINE, HINT)
    with pytest.raises(ManifestMismatch, match="no engine; rebuild with"):
        check_engine(tmp_path, "encoder", GRAPH, MACHINE, HINT)


def test_a_replaced_plan_or_edited_manifest_is_refused(tmp_path):
    write(tmp_path)
    plan_path(tmp_path, "decoder").write_bytes(b"OTHER PLAN")
    with pytest.raises(ManifestMismatch, match="field plan_sha256 differs"):
        check_engine(tmp_path, "decoder", GRAPH, MACHINE, HINT)
    assert not up_to_date(tmp_path, "decoder", key())
    write(tmp_path)
    d = json.loads(manifest_path(tmp_path, "decoder").read_text())
    d["profiles"][0]["dims"]["new"] = [1, 4, 4]  # edited by hand: the key no longer matches
    manifest_path(tmp_path, "decoder").write_text(json.dumps(d))
    with pytest.raises(ManifestMismatch, match="field cache_key differs"):
        check_engine(tmp_path, "decoder", GRAPH, MACHINE, HINT)


def test_unreadable_or_wrong_format_manifest(tmp_path):
    write(tmp_path)
    manifest_path(tmp_path, "decoder").write_text("{not json")
    with pytest.raises(ManifestMismatch, match="unreadable manifest"):
        check_engine(tmp_path, "decoder", GRAPH, MACHINE, HINT)
    manifest_path(tmp_path, "decoder").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ManifestMismatch, match="format 'something-else', expected 'fastblt-engine'"):
        check_engine(tmp_path, "decoder", GRAPH, MACHINE, HINT)


def test_rebuild_hint_names_a_non_default_engine_dir():
    assert rebuild_hint("art") == "rebuild with: fastblt build --artifacts art"
    assert rebuild_hint("art", "art/engines") == "rebuild with: fastblt build --artifacts art"
    assert rebuild_hint("art", "/e") == "rebuild with: fastblt build --artifacts art --engines /e"


def test_engine_from_path_deserializes_only_after_the_check(tmp_path, monkeypatch):
    from fastblt.engines.trt.build import EngineFromPath

    fake = make_fake_trt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    write(tmp_path, plan=json.dumps({"io": [], "profiles": [], "source": "decoder.onnx"}).encode(), gpu_name="other")
    with pytest.raises(ManifestMismatch, match="gpu_name differs"):
        EngineFromPath(tmp_path, "decoder", GRAPH, MACHINE, HINT)()
    assert ("deserialize_cuda_engine",) not in fake.log
    write(tmp_path, plan=json.dumps({"io": [], "profiles": [], "source": "decoder.onnx"}).encode())
    engine, manifest = EngineFromPath(tmp_path, "decoder", GRAPH, MACHINE, HINT)()
    assert ("deserialize_cuda_engine",) in fake.log and manifest.step == "decoder"


def test_a_plan_file_outside_the_engine_dir_is_refused(tmp_path):
    """A manifest may not point the loader at another file (`../x.plan`), even one whose sha256 it
    records: only `{step}.plan` next to it is ever deserialized."""
    engines = tmp_path / "engines"
    write(engines)
    (tmp_path / "x.plan").write_bytes(b"FOREIGN")
    d = json.loads(manifest_path(engines, "decoder").read_text())
    d.update(plan_file="../x.plan", plan_sha256=sha256_bytes(b"FOREIGN"), plan_bytes=7)
    manifest_path(engines, "decoder").write_text(json.dumps(d))
    with pytest.raises(ManifestMismatch, match=r"field plan_file is '\.\./x\.plan', expected decoder\.plan"):
        check_engine(engines, "decoder", GRAPH, MACHINE, HINT)


def test_an_edited_manifest_is_not_up_to_date(tmp_path):
    """`fastblt build` must rebuild an engine whose manifest was edited by hand (here gpu_name, the
    recorded key left as it was): the key recomputed from its fields no longer matches."""
    write(tmp_path)
    assert up_to_date(tmp_path, "decoder", key())
    d = json.loads(manifest_path(tmp_path, "decoder").read_text())
    d["gpu_name"] = "NVIDIA H200"
    manifest_path(tmp_path, "decoder").write_text(json.dumps(d))
    assert d["cache_key"] == key() and not up_to_date(tmp_path, "decoder", key())


def test_another_manifest_format_version_is_refused(tmp_path):
    """A manifest of a newer (or older) engine format is not read as if it were version 1."""
    write(tmp_path)
    d = json.loads(manifest_path(tmp_path, "decoder").read_text())
    d["format_version"] = 2
    manifest_path(tmp_path, "decoder").write_text(json.dumps(d))
    with pytest.raises(ManifestMismatch, match="format_version 2, expected 1"):
        check_engine(tmp_path, "decoder", GRAPH, MACHINE, HINT)
    assert not up_to_date(tmp_path, "decoder", key())
