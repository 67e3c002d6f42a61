"""scripts/gpu_check.sh: its skip path here (no GPU), and its check runner and report."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastblt.engines.trt.build import trt_availability

ROOT = Path(__file__).resolve().parents[3]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_skips_with_one_line_and_exit_0_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the skip path does not apply")
    p = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: SKIP: no CUDA device here")
    assert trt_availability().reason in lines[0]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["verdict"] == "skipped" and report["checks"] == []
    assert "SKIPPED" in (tmp_path / "out" / "gpu_check.md").read_text()


def test_a_failed_command_fails_the_run_and_is_reported(tmp_path):
    gc = load_gpu_check()
    runner = gc.Runner(tmp_path, budget_s=120)
    check = runner.command("build fp32", ["build", "--artifacts", str(tmp_path / "missing")])
    assert check.status == "fail" and check.detail.startswith("exit 2: error:")
    assert "no manifest" in check.output_tail
    runner.skip("parity (fp32)", "not run: build fp32 failed")
    assert not runner.passed
    jpath, mpath = gc.write_report(tmp_path, "fail", {"gpu": "none"}, runner.checks)
    data = json.loads(jpath.read_text())
    assert [c["status"] for c in data["checks"]] == ["fail", "not run"]
    md = mpath.read_text()
    assert "| build fp32 | fail |" in md and "| parity (fp32) | not run |" in md and "## build fp32" in md


def test_budget_spent_means_not_run(tmp_path):
    gc = load_gpu_check()
    runner = gc.Runner(tmp_path, budget_s=0)
    assert runner.command("export fp32", ["export", "--help"]).status == "not run"
    assert not runner.passed
    assert not gc.Runner(tmp_path, 10).passed  # zero checks is not a pass


def test_validate_summary_keeps_the_verdict_and_failures():
    gc = load_gpu_check()
    check = gc.Check("parity (fp16)", "fail", detail="exit 1: ...")
    check.data = {
        "verdict": "fail",
        "compared": 10,
        "failed": 1,
        "failures": ["torch vs trt | decoder | logits | random: cosine 0.9"],
        "pairs": {"torch vs trt": {"graphs": {"decoder": {"passed": False}, "encoder": {"passed": True}}}},
    }
    gc.validate_summary(check)
    assert "verdict fail, 10 compared, 1 failed" in check.detail
    assert check.data["graphs_passed"] == {"torch vs trt": {"decoder": False, "encoder": True}}


def test_bench_summary_lists_the_main_modes():
    gc = load_gpu_check()
    check = gc.Check("bench torch on cuda", "pass", detail="exit 0")
    check.data = {
        "rows": [
            {"name": "ar", "bytes_per_s": 100.4},
            {"name": "blt-s", "bytes_per_s": 250.0},
            {"name": "blt-s/k16", "bytes_per_s": 300.0},
        ],
        "meta": {},
        "targets": [],
    }
    gc.bench_summary(check)
    assert check.detail == "exit 0; ar 100 B/s, blt-s 250 B/s"
