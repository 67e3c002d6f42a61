"""benchmarks/learning_curves.py: reads both run formats, picks the last evaluation before each mark."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from click.testing import CliRunner

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "learning_curves.py"
_spec = importlib.util.spec_from_file_location("learning_curves", _PATH)
lc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lc)


def _evals(minutes: list[float], bpb: list[float]) -> dict[str, list[float]]:
    return {"step": [10.0 * i for i in range(len(bpb))], "elapsed": [60.0 * m for m in minutes], "bpb": bpb}


def test_mark_takes_the_last_evaluation_at_or_before_it_and_none_after_the_run():
    e = _evals([5, 10, 15, 20], [3.0, 2.5, 2.25, 2.0])
    assert lc.at_mark(e, 15) == 2.25
    assert lc.at_mark(e, 14.9) == 2.5
    assert lc.at_mark(e, 4) is None  # before the first evaluation
    assert lc.at_mark(e, 22) == 2.0  # within an interval of the end
    assert lc.at_mark(e, 30) is None  # the run had ended


def test_cli_reads_result_json_and_train_state_and_writes_the_table(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "result.json").write_text(json.dumps({"evals": _evals([5, 10, 15, 30], [3.0, 2.5, 2.25, 1.75])}))
    torch.save({"st": {"evals": _evals([5, 10, 15], [2.9, 2.4, 2.2])}}, b / "train_state.pt")
    out = tmp_path / "out"
    res = CliRunner().invoke(lc.main, ["--run", f"A={a}", "--run", f"B={b}", "--name", "c", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = {line.split(" | ")[0]: line for line in (out / "c.md").read_text().splitlines() if line.startswith("| ")}
    assert rows["| A"] == "| A | 2.250 | 1.750 | 1.750 (30) |"
    assert rows["| B"] == "| B | 2.200 |  | 2.200 (15) |"
    assert (out / "c.png").stat().st_size > 0
    assert json.loads((out / "c.json").read_text())["runs"]["B"]["bpb"] == [2.9, 2.4, 2.2]


def test_cli_refuses_a_run_without_evaluations_and_a_bad_spec(tmp_path):
    res = CliRunner().invoke(lc.main, ["--run", f"A={tmp_path}", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "neither result.json nor train_state.pt" in res.output
    (tmp_path / "result.json").write_text(json.dumps({"evals": {}}))
    res = CliRunner().invoke(lc.main, ["--run", f"A={tmp_path}", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "no periodic evaluation" in res.output
    res = CliRunner().invoke(lc.main, ["--run", "A", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "expected LABEL=DIR" in res.output
