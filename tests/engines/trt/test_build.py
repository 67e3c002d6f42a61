"""The engine builder's TensorRT call sequence, driven through a fake `tensorrt` (no GPU here).

What is checked is fastblt's side of the API contract: the network flags, that no precision
flag is ever set, TF32 cleared, one `set_shape` per dynamic input per profile with the derived
min/opt/max, the timing cache read and written back, engines skipped when their key matches.
"""

from __future__ import annotations

import json
import sys

import pytest
from trt_fakes import make_fake_trt, write_fake_export

from fastblt.engines.trt import build as trt_build
from fastblt.engines.trt.engine_cache import Machine, manifest_path, plan_path
from fastblt.engines.trt.profiles import graph_inputs, manifest_profiles
from fastblt.errors import BackendUnavailable, InputError, ManifestMismatch
from fastblt.model.config import tiny_config

MACHINE = Machine("10.99.0", "Fake GPU", "9.0")


@pytest.fixture
def export(tmp_path):
    manifest, _ = write_fake_export(tmp_path / "art", tiny_config(blt_d=True), max_step=32, max_batch=2)
    return tmp_path / "art", manifest


def use_fake(monkeypatch, **kw):
    fake = make_fake_trt(**kw)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_build, "current_machine", lambda device=None: MACHINE)
    return fake


def test_build_sequence_trt10(export, monkeypatch):
    art, manifest = export
    fake = use_fake(monkeypatch, flavor="10")
    records = trt_build.build_engines(art, profile={"prefill": 16}, workspace_gb=0.5)
    assert [r.status for r in records] == ["built"] * 5
    # strongly typed network: 1 << STRONGLY_TYPED (= 1 << 0 in the fake) for every graph
    assert [c for c in fake.log if c[0] == "create_network"] == [("create_network", 1)] * 5
    profiles = manifest_profiles(manifest, {"prefill": 16})
    for step, config in zip(manifest["graphs"], fake.configs, strict=True):
        names = [c[0] for c in config.calls]
        assert ("set_memory_pool_limit", "WORKSPACE", 1 << 29) in config.calls
        assert ("clear_flag", "TF32") in config.calls
        assert "set_flag" not in names  # precision lives in the graph, never in builder flags
        assert ("set_timing_cache", False) in config.calls  # ignore_mismatch=False
        # one profile per phase, each with a set_shape for every (dynamic) input
        inputs = graph_inputs(manifest, step)
        assert len(config.profiles) == len(profiles[step])
        for fp, p in zip(config.profiles, profiles[step], strict=True):
            assert sorted(fp.shapes) == sorted(t.name for t in inputs)
            for t in inputs:
                assert fp.shapes[t.name] == p.shapes(t)
    # the decoder's decode profile: S = 1; its prefill profile: S up to the requested chunk
    dec = fake.configs[list(manifest["graphs"]).index("decoder")]
    prefill = [p.name for p in profiles["decoder"]].index("prefill")
    assert dec.profiles[0].shapes["h"] == ((1, 1, 16), (1, 1, 16), (1, 1, 16))
    assert dec.profiles[prefill].shapes["h"] == ((1, 1, 16), (1, 16, 16), (1, 16, 16))
    assert dec.profiles[0].shapes["past.0.k"] == ((1, 2, 544, 8),) * 3  # a static ring: window 512 + max_step 32
    # the global step's linear cache: `past` from 1 slot to the global model's 4096 positions, opt 1024
    glob = fake.configs[list(manifest["graphs"]).index("global")]
    assert {p.shapes["past.0.k"] for p in glob.profiles} == {((1, 2, 1, 16), (1, 2, 1024, 16), (1, 2, 4096, 16))}
    # each engine has its manifest next to it
    for step in manifest["graphs"]:
        m = json.loads(manifest_path(art / "engines", step).read_text())
        assert m["trt_version"] == "10.99.0" and m["gpu_name"] == "Fake GPU" and m["compute_capability"] == "9.0"
        assert m["onnx_sha256"] == manifest["graphs"][step]["sha256"]
        assert m["build_flags"]["strongly_typed"] and m["build_flags"]["tf32"] is False
        assert plan_path(art / "engines", step).is_file()


def test_trt11_networks_are_built_without_the_removed_flags(export, monkeypatch):
    art, _ = export
    fake = use_fake(monkeypatch, flavor="11")
    trt_build.build_engines(art)
    assert {c for c in fake.log if c[0] == "create_network"} == {("create_network", 0)}
    for config in fake.configs:
        assert [c for c in config.calls if c[0] in ("set_flag", "clear_flag")] == [("clear_flag", "TF32")]


def test_optimization_level_is_a_build_flag(export, monkeypatch):
    art, _ = export
    fake = use_fake(monkeypatch)
    first = trt_build.build_engines(art)
    assert not any(hasattr(c, "builder_optimization_level") for c in fake.configs)  # TensorRT's default
    records = trt_build.build_engines(art, opt_level=1)
    assert [r.status for r in records] == ["built"] * 5 and records[0].cache_key != first[0].cache_key
    assert {c.builder_optimization_level for c in fake.configs[5:]} == {1}
    with pytest.raises(InputError, match="--opt-level 7: expected 0..5"):
        trt_build.build_engines(art, opt_level=7)


def test_engines_with_a_matching_key_are_skipped(export, monkeypatch):
    art, _ = export
    fake = use_fake(monkeypatch)
    trt_build.build_engines(art)
    builds = sum(c[0] == "build_serialized_network" for c in fake.log)
    events = []
    records = trt_build.build_engines(art, progress=lambda ev, step, i, n, rec: events.append((ev, step)))
    assert [r.status for r in records] == ["up to date"] * 5
    assert sum(c[0] == "build_serialized_network" for c in fake.log) == builds  # nothing rebuilt
    assert [e for e, _ in events] == ["skip"] * 5
    # a different profile is a different key: rebuilt
    records = trt_build.build_engines(art, profile={"verify": 5})
    assert [r.status for r in records].count("built") == 4  # decoder_block only runs blocks: unchanged
    # --force rebuilds everything
    assert [r.status for r in trt_build.build_engines(art, profile={"verify": 5}, force=True)] == ["built"] * 5


def test_timing_cache_is_reused_and_written_back(export, monkeypatch, tmp_path):
    art, _ = export
    fake = use_fake(monkeypatch)
    cache = tmp_path / "timing.cache"
    trt_build.build_engines(art, timing_cache=cache)
    created = [c[1] for cfg in fake.configs for c in cfg.calls if c[0] == "create_timing_cache"]
    assert created[0] == b""  # no cache yet
    assert created[1] == b"+tuned"  # the second build reads what the first wrote
    assert cache.read_bytes() == b"+tuned" * 5
    cache.write_bytes(b"foreign cache")
    with pytest.raises(trt_build.EngineBuildError, match="timing cache .* refused"):
        trt_build.build_engines(art, timing_cache=cache, force=True)


def test_parser_errors_are_reported(export, monkeypatch):
    art, _ = export
    use_fake(monkeypatch, parse_fails=True)
    with pytest.raises(trt_build.EngineBuildError, match="ONNX parser failed: fake parse error"):
        trt_build.build_engines(art)


def test_changed_onnx_files_are_refused_before_building(export, monkeypatch):
    art, _ = export
    fake = use_fake(monkeypatch)
    (art / "decoder.onnx").write_bytes(b"changed")
    with pytest.raises(ManifestMismatch, match="decoder.onnx.*sha256"):
        trt_build.build_engines(art)
    assert not any(c[0] == "Builder" for c in fake.log)


def test_build_without_tensorrt_says_why(export, monkeypatch):
    art, _ = export
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` -> ModuleNotFoundError
    with pytest.raises(BackendUnavailable, match="tensorrt is not installed .*pypi.nvidia.com"):
        trt_build.build_engines(art)


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`fastblt ARGS` in this process, through fastblt.cli.main (exit codes included)."""
    from fastblt.cli import main

    monkeypatch.setattr(sys, "argv", ["fastblt", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_dry_run_and_unavailable_exit_code(export, monkeypatch, capsys):
    art, _ = export
    code, out, err = run_cli(monkeypatch, capsys, "build", "--artifacts", str(art), "--dry-run", "--json")
    assert code == 0, err
    assert [p["name"] for p in json.loads(out)["profiles"]["decoder"]] == ["decode", "block", "verify", "prefill"]
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    code, _, err = run_cli(monkeypatch, capsys, "build", "--artifacts", str(art))
    assert code == 3  # backend unavailable
    assert "error: backend trt: unavailable here: tensorrt is not installed" in err
    code, _, err = run_cli(monkeypatch, capsys, "build", "--artifacts", str(art), "--profile", "prefill=999")
    assert code == 2 and "exceeds the export's max new positions" in err
    for workspace in ("nan", "0", "-2"):  # click's FloatRange would let NaN through
        code, _, err = run_cli(monkeypatch, capsys, "build", "--artifacts", str(art), "--workspace", workspace)
        assert code == 2 and "--workspace" in err


def test_cli_builds_and_reports_progress(export, monkeypatch, capsys):
    art, _ = export
    use_fake(monkeypatch)
    code, out, err = run_cli(monkeypatch, capsys, "build", "--artifacts", str(art), "--json")
    assert code == 0, err
    assert "[1/5] entropy       building ..." in err and "[5/5] decoder_block built in" in err
    assert [e["status"] for e in json.loads(out)["engines"]] == ["built"] * 5
    code, out, err = run_cli(monkeypatch, capsys, "build", "--artifacts", str(art))
    assert code == 0 and "up to date (key" in err and "0 built, 5 up to date" in err


def test_a_parsed_network_with_other_inputs_is_refused(export, monkeypatch):
    """The engine binds inputs by the export manifest's names: a network the parser read with other
    inputs (another or a re-exported ONNX) is a build error, not an engine that binds wrongly."""
    art, manifest = export
    use_fake(monkeypatch)
    names = [t.name for t in graph_inputs(manifest, "decoder")]
    builder, network, _ = trt_build.NetworkFromOnnxPath(art / "decoder.onnx", names)()  # as written: accepted
    assert [network.get_input(i).name for i in range(network.num_inputs)] == names
    with pytest.raises(trt_build.EngineBuildError, match="parsed network inputs .*, manifest has "):
        trt_build.NetworkFromOnnxPath(art / "decoder.onnx", names[::-1])()


@pytest.mark.parametrize("level", [-1, 6])
def test_optimization_levels_outside_0_to_5_are_refused(export, monkeypatch, level):
    """TensorRT's builder optimization levels are 0..5; another value is refused before any build."""
    art, _ = export
    fake = use_fake(monkeypatch)
    with pytest.raises(InputError, match=f"--opt-level {level}: expected 0..5"):
        trt_build.build_engines(art, opt_level=level)
    assert not any(c[0] == "Builder" for c in fake.log)
