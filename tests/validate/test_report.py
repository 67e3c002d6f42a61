"""The report: indexed by pair, graph, output; bool() is the verdict; zero comparisons fail."""

from __future__ import annotations

import json

import pytest
import torch

from fastblt.errors import InputError
from fastblt.validate.metrics import FP32, compare
from fastblt.validate.report import Report


def _entry(err: float):
    ref = torch.zeros(3)
    return compare("logits", ref, ref + err, FP32)


def test_a_report_with_no_compared_output_fails():
    r = Report()
    assert not r and r.compared == 0
    assert r.failures() == ["nothing was compared: a report with zero compared outputs is a failure"]
    r.skip("trt", "tensorrt is not installed")
    assert not r  # skipped is not passed


def test_verdict_index_and_failure_lines():
    r = Report()
    r.add(("torch", "ort"), "decoder", "logits", "random cache=3 new=2", _entry(0.0))
    assert r and r.verdict == "pass"
    r.add(("torch", "ort"), "decoder", "present.0.k", "random cache=3 new=2", _entry(2e-3))
    assert not r and r.failed == 1 and r.compared == 2
    assert r[("torch", "ort")]["decoder"]["present.0.k"]["random cache=3 new=2"].max_abs > 1e-3
    assert r.failed_graphs() == [(("torch", "ort"), "decoder")]
    assert r.failures() == ["torch vs ort | decoder | present.0.k | random cache=3 new=2: max_abs 0.002 > 1.00e-04"]


def test_a_check_that_raised_fails_the_report():
    r = Report()
    r.add(("torch", "ort"), "decoder", "logits", "c", _entry(0.0))
    r.error("ort | decoder | c: raised RuntimeError")
    assert not r


def test_serialization(tmp_path):
    r = Report(meta={"dtype": "float32", "atol": 1e-4})
    r.add(("torch", "ort"), "decoder", "logits", "a", _entry(0.0))
    r.add(("torch", "ort"), "decoder", "present.1.k", "a", _entry(5e-4))
    r.skip("trt", "no GPU")
    d = json.loads(r.to_json())
    assert d["verdict"] == "fail" and d["compared"] == 2 and d["skipped"] == [{"what": "trt", "reason": "no GPU"}]
    out = d["pairs"]["torch vs ort"]["graphs"]["decoder"]["outputs"]["present.1.k"]
    assert not out["passed"] and out["worst"]["max_abs"] > 4e-4 and out["cases"]["a"]["failed"]
    md = r.to_markdown()
    assert "# fastblt validate: FAIL" in md and "**FAIL**" in md and "trt: no GPU" in md
    paths = r.save(tmp_path)
    assert {p.name for p in paths.values()} == {"report.json", "report.md", "error_per_layer.png"}
    assert paths["plot"].stat().st_size > 1000


def test_save_replaces_an_earlier_report_only_when_told(tmp_path):
    """A report.md already there is the user's until they say otherwise; once replaced, no plot of
    the earlier report stays beside a report that drew none."""
    (tmp_path / "report.md").write_text("earlier")
    (tmp_path / "error_per_layer.png").write_text("earlier")
    r = Report()
    r.add(("torch", "ort"), "decoder", "logits", "a", _entry(0.0))  # no per-layer series: no plot
    with pytest.raises(InputError, match=r"already holds report\.md, error_per_layer\.png; pass overwrite=True"):
        r.save(tmp_path)
    assert (tmp_path / "report.md").read_text() == "earlier"
    paths = r.save(tmp_path, overwrite=True)
    assert set(paths) == {"json", "markdown"} and sorted(p.name for p in tmp_path.iterdir()) == [
        "report.json",
        "report.md",
    ]
    with pytest.raises(InputError, match="exists and is not a directory"):
        r.save(tmp_path / "report.md", overwrite=True)
