"""`fastblt bench`: --render checks its input whole before writing anything, and every requested
backend is checked before any measurement."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fastblt.bench import runtime
from fastblt.engines.base import Availability
from fastblt.engines.trt import build

from tiny import run_cli

SAVED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "runtime_bench.json"
OUTPUTS = ("runtime_bench.json", "runtime_bench.md", "runtime_bench.png")


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """An --out directory holding earlier results, which a failed render must leave as they are."""
    out = tmp_path / "out"
    out.mkdir()
    for name in OUTPUTS:
        (out / name).write_bytes(f"earlier {name}\n".encode())
    return out


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _saved() -> dict:
    return json.loads(SAVED.read_text())


def _edited(edit) -> str:
    result = _saved()
    edit(result)
    return json.dumps(result)


def _drop(obj: dict, key: str) -> None:
    del obj[key]


# (name, what the file holds: text, or None for a directory, or "missing"; what the error names)
BAD_RENDER = [
    ("missing.json", "missing", "no such file"),
    ("broken.json", '{"rows": [', "invalid JSON"),
    ("a_dir", None, "is a directory"),
    ("no_meta.json", '{"rows": []}', "meta: missing"),
    ("list.json", "[1, 2]", "top level: expected an object, got a list"),
    ("no_rows.json", _edited(lambda r: r.update(rows=[])), "rows: empty"),
    ("no_eq8.json", _edited(lambda r: _drop(r["rows"][1]["eq8"], "blt-3b")), "rows[1].eq8.blt-3b: missing"),
    ("str_bytes.json", _edited(lambda r: r["meta"].update(max_bytes="256")), "meta.max_bytes: expected an integer"),
    ("bad_hf.json", _edited(lambda r: r["hf"].update(bytes_per_s=None)), "hf.bytes_per_s: expected a number"),
    ("ar_zero.json", _edited(lambda r: r["rows"][0].update(bytes_per_s=0)), "cannot render it (ZeroDivisionError"),
    # a histogram's keys are counts (accepted bytes, unmasking steps): a key like "two" is a wrong file
    (
        "hist_key.json",
        _edited(lambda r: r["rows"][1]["accept_hist"].update(two=1)),
        "rows[1].accept_hist: key 'two' is not an integer",
    ),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_RENDER, ids=[b[0] for b in BAD_RENDER])
def test_bad_render_input_is_one_line_rc_2_and_writes_nothing(
    tmp_path, out_dir, monkeypatch, capsys, name, content, message
):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif content != "missing":
        path.write_text(content)
    before = _snapshot(out_dir)
    code, out, err = run_cli(["bench", "--render", str(path), "--out", str(out_dir)], monkeypatch, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: --render {path}: ") and message in err, err
    assert "Traceback" not in err and out == ""
    assert _snapshot(out_dir) == before  # nothing replaced, no temp file left behind


@pytest.mark.parametrize("where", ["file", "below_a_file"])
def test_out_that_is_not_a_directory_is_rc_2_and_untouched(tmp_path, monkeypatch, capsys, where):
    src = tmp_path / "saved.json"
    shutil.copyfile(SAVED, src)
    blocker = tmp_path / "results"
    blocker.write_bytes(b"a user's file\n")
    out = blocker if where == "file" else blocker / "sub"
    code, _, err = run_cli(["bench", "--render", str(src), "--out", str(out)], monkeypatch, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: --out {out}: not a directory"), err
    assert blocker.read_bytes() == b"a user's file\n"
    assert src.read_bytes() == SAVED.read_bytes()


def test_render_of_a_saved_result_writes_all_three(tmp_path, out_dir, monkeypatch, capsys):
    src = tmp_path / "saved.json"
    shutil.copyfile(SAVED, src)
    code, out, err = run_cli(["bench", "--render", str(src), "--out", str(out_dir)], monkeypatch, capsys)
    assert code == 0, err
    assert out.startswith("# Runtime benchmark")
    assert (out_dir / "runtime_bench.md").read_text() == out.removesuffix("\n")
    written = json.loads((out_dir / "runtime_bench.json").read_text())
    assert written["rows"] == _saved()["rows"] and written["meta"] == _saved()["meta"]
    assert (out_dir / "runtime_bench.png").read_bytes().startswith(b"\x89PNG\r\n")
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(OUTPUTS)  # no temp file left
    assert src.read_bytes() == SAVED.read_bytes()


def test_render_in_place_keeps_the_input_json(tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    out.mkdir()
    src = out / "runtime_bench.json"
    shutil.copyfile(SAVED, src)
    (out / "runtime_bench.md").write_text("stale\n")
    os.utime(src, ns=(10**18, 10**18))
    code, _, err = run_cli(["bench", "--render", str(src), "--out", str(out)], monkeypatch, capsys)
    assert code == 0, err
    assert src.read_bytes() == SAVED.read_bytes() and src.stat().st_mtime_ns == 10**18  # not rewritten
    assert (out / "runtime_bench.md").read_text().startswith("# Runtime benchmark")
    assert (out / "runtime_bench.png").exists()


@pytest.fixture
def no_measurement(monkeypatch):
    """Any step of a run (prompts, a backend, the peer) fails the test."""

    def measured(*args, **kwargs):
        raise AssertionError("the bench started measuring")

    for name in ("bench_prompts", "Generator", "_hf_peer"):
        monkeypatch.setattr(runtime, name, measured)


def test_unavailable_backend_exits_3_before_any_measurement(tmp_path, monkeypatch, capsys, no_measurement):
    monkeypatch.setattr(build, "trt_availability", lambda: Availability("trt", False, "no TensorRT in this test"))
    out = tmp_path / "out"
    code, out_text, err = run_cli(["bench", "--backends", "ort,trt", "--out", str(out)], monkeypatch, capsys)
    assert code == 3
    assert err == "error: backend trt: unavailable here: no TensorRT in this test\n"
    assert out_text == "" and not out.exists()


def test_trt_without_artifacts_exits_2_before_any_measurement(tmp_path, monkeypatch, capsys, no_measurement):
    monkeypatch.setattr(build, "trt_availability", lambda: Availability("trt", True, "pretend"))
    code, _, err = run_cli(["bench", "--backends", "ort,trt", "--out", str(tmp_path / "out")], monkeypatch, capsys)
    assert code == 2 and "needs --artifacts DIR" in err and err.count("\n") == 1, err


def test_bad_out_is_refused_before_any_measurement(tmp_path, monkeypatch, capsys, no_measurement):
    blocker = tmp_path / "results"
    blocker.write_text("x\n")
    code, _, err = run_cli(["bench", "--backends", "torch", "--out", str(blocker)], monkeypatch, capsys)
    assert code == 2 and err.startswith(f"error: --out {blocker}: not a directory"), err
