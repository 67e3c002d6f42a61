"""benchmarks/train_speed.py: both precisions really run (and are the trainer's own step), the table says what ran."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from fastblt.model.blt import EntropyModel
from fastblt.model.config import VOCAB_SIZE
from fastblt.train import loop as T
from fastblt.train.corpus import Corpus

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "train_speed.py"
_spec = importlib.util.spec_from_file_location("train_speed", _PATH)
ts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ts)


def test_measure_alternates_fp32_and_bf16_steps_of_the_trainer():
    plan = T.smoke_plan()
    model = EntropyModel(plan.baseline, VOCAB_SIZE)
    seen = []
    loss = T.byte_lm_step(model)

    def step(x, g):  # what the trainer's step runs under
        seen.append(torch.is_autocast_enabled("cpu"))
        return loss(x, g)

    before = [p.detach().clone() for p in model.parameters()]
    configs = [("fp32", 1), ("bf16", 1), ("fp32", 2)]
    threads = torch.get_num_threads()
    rows = ts.measure(model, plan.base, step, Corpus.load(limit_bytes=50_000), 0.0, configs, warmup=1)
    assert torch.get_num_threads() == threads  # restored
    assert seen == [False, True, False] * 3  # warm-up, then 2 timed steps each, alternating configurations
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # steps ran
    assert [(r["precision"], r["threads"], r["steps"]) for r in rows] == [(p, n, 2) for p, n in configs]
    assert rows[0]["speed_vs_first"] == 1.0
    assert rows[1]["speed_vs_first"] == rows[0]["s_per_step"] / rows[1]["s_per_step"]
    cpu = T.cpu_description()
    res = {"command": "python benchmarks/train_speed.py", "cpu": cpu, "torch": torch.__version__}
    md = ts.render(res | {"rows": [{"phase": "byte LM", "batch": 4, "seq_bytes": 128, "configs": rows}]})
    assert f"| byte LM | 4 x 128 | bf16 | 1 | {rows[1]['s_per_step']:.2f} |" in md
    assert f"--precision auto` picks {'bf16' if cpu['native_bf16'] else 'fp32'} on this CPU" in md


def test_bad_lists_are_refused_by_name():
    from click.testing import CliRunner

    for opt, value in (("--threads", "1,0"), ("--threads", "x"), ("--precisions", "fp16"), ("--precisions", ",")):
        res = CliRunner().invoke(ts.main, [opt, value])
        assert res.exit_code == 2 and f"Invalid value for '{opt}'" in res.output, (opt, value, res.output)


def test_phases_are_the_default_recipes():
    plan = T.default_plan(1.0, 1.0, 1.0)
    got = {name: (pc, sum(p.numel() for p in m.parameters())) for name, m, pc, _ in ts.phases()}
    assert got["BLT-D"][0] == plan.blt and got["baseline byte LM"][0] == plan.base
    assert got["entropy LM"][0] == plan.entropy
    assert got["baseline byte LM"][1] == sum(p.numel() for p in EntropyModel(plan.baseline, VOCAB_SIZE).parameters())
