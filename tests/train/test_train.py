"""`fastblt train`: smoke training, the BLT-D block layout and loss, the corpus split."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from click.testing import CliRunner

from fastblt.model.config import PatchingConfig
from fastblt.model.patching import patch_lengths_from_entropies
from fastblt.train.blt_d import (
    build_blocks,
    greedy_continue,
    lengths_from_starts,
    mask_blocks,
    mask_loss,
    patch_starts_from_entropies,
)
from fastblt.train.corpus import (
    Corpus,
    choose_heldout,
    heldout_list_digest,
    list_corpus_files,
    read_heldout_list,
    stdlib_dir,
)

PAD, MASK = 261, 260


def _threads() -> list[str]:
    return ["--threads", "1"]  # one thread: the test machine is shared (the fixture restores it)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from fastblt.cli.train import train

    out = tmp_path_factory.mktemp("smoke")
    threads = torch.get_num_threads()
    res = CliRunner().invoke(
        train,
        ["--smoke", "--out", str(out), "--phase", "main", "--mask-weight", "0.5", "--lr", "0.012", *_threads()]
        + ["--precision", "bf16"],  # the bf16 path on every machine (auto picks fp32 on CPUs without native bf16)
        catch_exceptions=False,
    )
    torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    return out


def _falls(losses: list[float], k: int = 5) -> bool:
    return sum(losses[-k:]) / k < sum(losses[:k]) / k - 0.3


def test_smoke_loss_falls(smoke_run):
    ent = json.loads((smoke_run / "entropy" / "result.json").read_text())
    blt = json.loads((smoke_run / "blt" / "result.json").read_text())
    assert _falls(ent["hist"]["loss"]), ent["hist"]["loss"]
    assert _falls(blt["hist"]["loss_clean"]), blt["hist"]["loss_clean"]
    assert _falls(blt["hist"]["loss"]), blt["hist"]["loss"]


def test_smoke_checkpoint_loads_and_generates(smoke_run):
    from fastblt.formats.checkpoint import load_checkpoint

    model = load_checkpoint(smoke_run / "checkpoint")
    assert model.config.is_blt_d and model.config.blt_d.block_size == 8
    tokens = torch.tensor([[1] + [b + 4 for b in b"def f(x):\n    return"]])
    logits = model(tokens)
    assert logits.shape == (1, tokens.shape[1], 260) and torch.isfinite(logits).all()
    assert len(greedy_continue(model, b"def f(x):\n", 4)) > 0


def test_smoke_checkpoint_is_stored_in_half_precision_and_the_report_measures_what_is_stored(smoke_run):
    from safetensors import safe_open

    from fastblt.formats.checkpoint import checkpoint_hash
    from fastblt.train.blt_d import eval_bpb
    from fastblt.train.corpus import Corpus
    from fastblt.train.loop import blt_forward, smoke_plan
    from fastblt.train.report import load_final_model

    with safe_open(str(smoke_run / "checkpoint" / "model.safetensors"), "pt") as f:
        names = f.keys()
        assert {f.get_slice(k).get_dtype() for k in names} == {"F16"}
    report = json.loads((smoke_run / "report.json").read_text())
    assert report["blt_d"]["checkpoint_dtype"] == "float16"
    assert report["checkpoint_hash"] == checkpoint_hash(smoke_run / "checkpoint")
    assert "stored as float16" in (smoke_run / "REPORT.md").read_text()
    plan = smoke_plan()
    windows = Corpus.load(limit_bytes=plan.corpus_limit_bytes).heldout_windows(plan.eval_bytes, plan.eval_windows)
    model = load_final_model(smoke_run)
    assert next(model.parameters()).dtype == torch.float32
    assert abs(eval_bpb(blt_forward(model), windows)["bpb"] - report["blt_d"]["heldout_ar"]["bpb"]) < 1e-6


def test_smoke_report_written(smoke_run):
    report = json.loads((smoke_run / "report.json").read_text())
    for name in ("REPORT.md", "loss_curve.png", "report.json"):
        assert (smoke_run / name).stat().st_size > 0
    assert set(report["blt_d"]["masked_acc_inference_layout"]) == {"0.1", "0.25", "0.5", "0.75", "1.0"}
    assert report["blt_d"]["heldout_ar"]["bpb"] > 0
    samples = report["blt_d"]["samples"]
    assert len(samples) == 2 and all({"ar", "blt-s", "blt-dv", "blt-d"} <= set(s) for s in samples)
    assert all(s["lossless_agree"] for s in samples)  # greedy ar == blt-s == blt-dv
    assert "`blt-dv`, acceptance" in (smoke_run / "REPORT.md").read_text()
    by_file = report["blt_d"]["bits_by_file"]
    assert by_file["largest"] == "pydoc_data/topics.py" and by_file["train_windows"]["blt_d"] > 0
    assert "Held-out bits per byte file by file" in (smoke_run / "REPORT.md").read_text()
    tested = [r for r in by_file["files"] if any(f"/{d}/" in f"/{r['file']}" for d in ("test", "tests", "idle_test"))]
    assert by_file["n_test_files"] == len(tested) > 0
    assert min(r["bpb"]["blt_d"] for r in tested) <= by_file["test_files"]["blt_d"]
    assert by_file["test_files"]["blt_d"] <= max(r["bpb"]["blt_d"] for r in tested)
    # the earlier defaults' headline files, all still held out, evaluated on their own
    prev = report["blt_d"]["heldout_previous_list"]
    assert prev["files"] == 18 and prev["blt_d"] != report["blt_d"]["heldout_ar"]["bpb"]
    assert "On the 18 files of the first held-out list " in (smoke_run / "REPORT.md").read_text()
    assert report["corpus"]["heldout_from_tests"] and "draws from them too" in (smoke_run / "REPORT.md").read_text()
    from fastblt.train.loop import cpu_description
    from fastblt.train.report import cpu_words

    (sitting,) = report["blt_d"]["sittings"]  # the machine and settings its bytes/s were measured with
    assert sitting == {"from_step": 0, "from_s": 0.0, "bf16": True, "threads": 1, "cpu": cpu_description()}
    assert f"| {cpu_words(cpu_description())} |" in (smoke_run / "REPORT.md").read_text()
    assert "sittings:" not in (smoke_run / "REPORT.md").read_text()  # one sitting: nothing more to say
    assert "one torch thread per process;" in (smoke_run / "REPORT.md").read_text()


def test_bits_by_patch_position_add_up_to_the_held_out_bits_per_byte(smoke_run):
    from fastblt.model.blt import EntropyModel
    from fastblt.model.config import VOCAB_SIZE, StackConfig
    from fastblt.train.blt_d import eval_bpb
    from fastblt.train.report import bits_by_patch_position, load_final_model

    report = json.loads((smoke_run / "report.json").read_text())
    rows = report["blt_d"]["bits_by_patch_position"]
    assert abs(sum(r["share"] for r in rows) - 1) < 1e-9 and rows[0]["share"] > 0
    weighted = sum(r["share"] * r["blt_d_bits"] for r in rows if r["share"])
    assert abs(weighted - report["blt_d"]["heldout_ar"]["bpb"]) < 1e-3
    model = load_final_model(smoke_run)
    torch.manual_seed(0)
    baseline = EntropyModel(StackConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, window=64), VOCAB_SIZE).eval()
    windows = torch.randint(4, 260, (3, 65))
    windows[:, 0] = 1
    rows = bits_by_patch_position(model, baseline, windows, buckets=4)
    with torch.no_grad():
        want = eval_bpb(baseline, windows)["bpb"]
    assert abs(sum(r["share"] * r["baseline_bits"] for r in rows if r["share"]) - want) < 1e-3


def test_a_later_report_states_the_mask_weight_and_lr_the_blt_d_trained_with(smoke_run):
    from fastblt.cli.train import train

    threads = torch.get_num_threads()
    res = CliRunner().invoke(train, ["--smoke", "--out", str(smoke_run), "--phase", "report", *_threads()])
    torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    report = json.loads((smoke_run / "report.json").read_text())
    assert report["blt_d"]["phase"]["mask_weight"] == 0.5  # not this process's plan (1.0 for --smoke)
    assert report["blt_d"]["phase"]["lr"] == 0.012  # --lr of the training run (smoke: 1e-2)
    md = (smoke_run / "REPORT.md").read_text()
    assert "window + 0.5 x (sum over masked block cells" in md and "peak lr 0.012 (global transformer 0.25x)," in md
    assert "bf16 autocast forward passes" in md and "fan-in scaled truncated-normal initialisation" in md


def test_resume_continues_a_finished_phase(smoke_run):
    from fastblt.cli.train import train

    before = json.loads((smoke_run / "blt" / "result.json").read_text())["steps"]
    threads = torch.get_num_threads()
    res = CliRunner().invoke(train, ["--smoke", "--out", str(smoke_run), "--phase", "blt", "--resume", *_threads()])
    torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    saved = torch.load(smoke_run / "blt" / "train_state.pt", weights_only=True)
    assert saved["st"]["step"] == before and saved["st"]["done"] == 1


# ----------------------------------------------------------------------------- blocks
def _example():
    # N = 12 tokens; patches: [0] [1 2 3] [4 5] [6 7 8 9 10 11]
    tokens = torch.arange(12).view(1, 12) + 10
    lengths = torch.tensor([[1, 3, 2, 6]])
    return tokens, lengths


def test_blocks_start_at_patch_starts_after_the_first():
    tokens, lengths = _example()
    clean, starts, read, valid = build_blocks(tokens, lengths, block_size=4, pad_id=PAD)
    assert starts.tolist() == [[1, 4, 6]]
    assert read.tolist() == [[0, 1, 2]]  # the patch ending right before each block
    assert valid.tolist() == [[True, True, True]]
    assert clean[0, 0].tolist() == [11, 12, 13, 14]  # overlapping: runs past its own patch
    assert clean[0, 1].tolist() == [14, 15, 16, 17]


def test_blocks_pad_past_the_end_and_fill_rows():
    tokens = torch.cat([_example()[0], _example()[0]])
    lengths = torch.tensor([[1, 3, 2, 6], [1, 9, 2, 0]])
    clean, starts, read, valid = build_blocks(tokens, lengths, block_size=8, pad_id=PAD)
    assert clean[0, 2].tolist() == [16, 17, 18, 19, 20, 21, PAD, PAD]  # starts at 6, N = 12
    assert valid[1].tolist() == [True, True, False]  # row 1 has two blocks; the filler is all PAD
    assert (clean[1, 2] == PAD).all()
    assert clean[1, 1].tolist() == [20, 21] + [PAD] * 6


def test_max_blocks_keeps_a_subset():
    tokens = torch.arange(40).view(1, 40) + 4
    lengths = torch.tensor([[1] + [3] * 13])
    g = torch.Generator().manual_seed(0)
    _, starts, read, valid = build_blocks(tokens, lengths, block_size=8, pad_id=PAD, gen=g, max_blocks=5)
    assert starts.shape == (1, 5) and valid.all()
    assert all((s - 1) % 3 == 0 for s in starts[0].tolist())
    assert (read == (starts - 1) // 3).all()


def test_masked_fraction_follows_t_and_never_pad():
    clean = torch.full((4, 50, 8), 100)
    clean[:, :, 6:] = PAD
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    m = mask_blocks(clean, t, MASK, PAD, torch.Generator().manual_seed(0))
    assert not m[:, :, 6:].any()
    frac = m[:, :, :6].float().mean(dim=(1, 2))
    assert torch.allclose(frac, t, atol=0.06), frac


def test_mask_loss_excludes_pad_and_weights_by_one_over_t():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 4, 262)
    clean = torch.tensor([[[5, 6, 7, 8], [9, 10, PAD, PAD]]])
    masked = torch.tensor([[[True, False, True, False], [True, True, False, False]]])
    t = torch.tensor([0.5])
    loss = mask_loss(logits, clean, masked, t, PAD)
    logp = logits.log_softmax(-1)
    by_hand = -(logp[0, 0, 0, 5] + logp[0, 0, 2, 7] + logp[0, 1, 0, 9] + logp[0, 1, 1, 10]) / 0.5 / 6
    assert torch.allclose(loss, by_hand)
    garbage = logits.clone()
    garbage[0, 1, 2:] = 1e4 * torch.randn(2, 262)  # logits at PAD cells do not matter
    assert torch.allclose(mask_loss(garbage, clean, masked, t, PAD), loss)
    small = mask_loss(logits, clean, masked, torch.tensor([0.001]), PAD, t_min=0.05)
    assert torch.allclose(small, loss * 0.5 / 0.05)  # t clamped


def test_vectorized_patching_matches_reference():
    torch.manual_seed(1)
    ent = torch.rand(3, 40) * 3
    ref = patch_lengths_from_entropies(ent, PatchingConfig(threshold=2.0))
    ours = lengths_from_starts(patch_starts_from_entropies(ent, 2.0))
    for r, o in zip(ref.tolist(), ours.tolist(), strict=True):
        assert [x for x in r if x] == [x for x in o if x]


# ----------------------------------------------------------------------------- corpus
def test_heldout_list_is_big_enough_and_disjoint():
    """>= 5% of the corpus `fastblt train` trains on (library and tests), and never trained on."""
    listed = read_heldout_list()
    files = list_corpus_files(include_tests=True)
    root = stdlib_dir()
    present = [f for f in listed if f in set(files)]
    assert len(present) >= 0.9 * len(listed)
    held = sum((root / f).stat().st_size for f in present)
    total = sum((root / f).stat().st_size for f in files)
    assert held >= 0.05 * total
    corpus = Corpus.load(limit_bytes=100_000, include_tests=True)
    assert not set(corpus.train_files) & set(listed)
    assert all("site-packages" not in f for f in files)
    assert all("/test/" not in f"/{f}" for f in list_corpus_files())


def test_heldout_rule_chose_the_committed_list():
    """On the Python the list was drawn from, the rule gives it back (elsewhere files differ)."""
    if sys.version_info[:3] != (3, 11, 7):
        pytest.skip(f"the list was drawn on CPython 3.11.7; this is {sys.version.split()[0]}")
    assert choose_heldout() == read_heldout_list()


def test_include_tests_adds_test_dirs_to_the_training_side_only(tmp_path):
    for rel in ("a.py", "b.py", "test/t.py", "pkg/tests/u.py", "idlelib/idle_test/v.py", "site-packages/x.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n" * 20)
    listed = tmp_path / "heldout.txt"
    listed.write_text("b.py\n")
    plain = Corpus.load(tmp_path, listed)
    full = Corpus.load(tmp_path, listed, include_tests=True)
    assert plain.train_files == ["a.py"]
    assert full.train_files == ["a.py", "idlelib/idle_test/v.py", "pkg/tests/u.py", "test/t.py"]
    assert plain.heldout_files == full.heldout_files == ["b.py"]
    assert full.n_train_bytes > plain.n_train_bytes
    # a held-out test file is held out (not missing) when the tests do not train
    listed.write_text("b.py\ntest/t.py\n")
    plain = Corpus.load(tmp_path, listed)
    assert plain.heldout_files == ["b.py", "test/t.py"] and plain.missing_heldout == []
    assert plain.train_files == ["a.py"]


def test_code_windows_leave_out_the_largest_heldout_file(tmp_path):
    texts = {"a.py": b"a" * 300, "b.py": b"b" * 300, "c.py": b"c" * 200, "prose.py": b"p" * 900}
    for name, data in texts.items():
        (tmp_path / name).write_bytes(data)
    listed = tmp_path / "heldout.txt"
    listed.write_text("b.py\nc.py\nprose.py\n")
    w = Corpus.load(tmp_path, listed).code_windows(per_file=8, n_bytes=100)
    assert w.shape == (5, 101)  # 3 windows of b.py, 2 of c.py, none of the largest file
    assert set(w[:, 1:].flatten().tolist()) == {ord("b") + 4, ord("c") + 4}


def test_windows_start_with_bos():
    corpus = Corpus.load(limit_bytes=100_000)
    x = corpus.sample(3, 64, torch.Generator().manual_seed(0))
    assert x.shape == (3, 65) and (x[:, 0] == 1).all() and (x[:, 1:] >= 4).all()
    w = corpus.heldout_windows(256, 5)
    assert w.shape == (5, 257) and (w[:, 0] == 1).all()


def _toy_corpus() -> Corpus:
    import numpy as np

    texts = [b"a" * 300, b"def f(x):\n    return x\n" * 40, b"", b"The quick brown fox. " * 10]
    train = np.frombuffer(b"import os\n" * 100, dtype=np.uint8).copy()
    return Corpus(stdlib_dir(), ["t.py"], ["a.py", "b.py", "c.py", "d.py"], [], train, np.array([0, 1000]), texts)


def test_heldout_window_index_names_the_file_and_offset_of_every_headline_window():
    corpus = _toy_corpus()
    index = corpus.heldout_window_index(64, None)
    assert [f for f, _ in index] == [0] * 4 + [1] * 14 + [3] * 3  # full windows only, list order
    windows = corpus.heldout_windows(64, None)
    for (f, s), row in zip(index, windows, strict=True):
        assert bytes((row[1:] - 4).tolist()) == corpus.heldout_texts[f][s : s + 64]
    picked = corpus.heldout_window_index(64, 5)
    assert len(picked) == 5 and picked[0] == index[0] and picked[-1] == index[-1]
    assert torch.equal(corpus.heldout_windows(64, 5), corpus._windows(picked, 64))
    assert corpus.file_windows(2, 64) is None and corpus.file_windows(1, 64, 3).shape == (3, 65)


def test_bits_by_file_weights_files_by_their_windows_and_reports_training_windows():
    from fastblt.train.blt_d import eval_bpb
    from fastblt.train.report import bits_by_file

    corpus = _toy_corpus()
    prior = torch.randn(260, generator=torch.Generator().manual_seed(0))

    def unigram(x):  # a fixed next-byte distribution: bits differ by file content
        return prior.expand(*x.shape, 260)

    t = bits_by_file({"m": unigram}, corpus, 64, headline=6, per_file=8, train=3)
    assert [r["file"] for r in t["files"]] == ["a.py", "b.py", "d.py"]  # c.py is shorter than a window
    assert abs(sum(r["share"] for r in t["files"]) - 1) < 1e-9
    assert t["largest"] == "b.py"
    rest = torch.cat([corpus.file_windows(i, 64, 8) for i in (0, 3)])
    assert abs(t["without_largest"]["m"] - eval_bpb(unigram, rest)["bpb"]) < 1e-6
    assert t["files"][0]["bpb"]["m"] != t["files"][2]["bpb"]["m"]
    assert t["train_windows"]["m"] > 0 and t["n_train_windows"] == 3


def test_python_shape_checks_indentation_and_brackets():
    from fastblt.train.report import python_shape

    good = python_shape("    def f(self, x):", "        y = g(x, [1, 2])  # (\n        return {'a': y}\n  ")
    assert good == {"body_indented": True, "indent_by_4": True, "brackets_balanced": True}
    bad = python_shape("def f(x):", "def g(':)'):\n   h(x))\n")
    assert bad == {"body_indented": False, "indent_by_4": False, "brackets_balanced": False}
    assert python_shape("def f():", "    return (")["brackets_balanced"] is None  # no complete line


def test_baseline_lr_sets_only_the_baseline_and_is_recorded(tmp_path):
    from fastblt.cli.train import train

    threads = torch.get_num_threads()
    args = ["--smoke", "--out", str(tmp_path), "--phase", "baseline", "--lr", "0.02", "--baseline-lr", "0.011"]
    res = CliRunner().invoke(train, args)
    torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "baseline" / "result.json").read_text())["phase"]["lr"] == 0.011
    for flag, value in (("--lr", "0"), ("--baseline-lr", "0"), ("--threads", "0"), ("--lr", "nan"),
                        ("--baseline-lr", "inf"), ("--mask-weight", "nan"), ("--mask-weight", "-1")):  # fmt: skip
        bad = CliRunner().invoke(train, ["--smoke", "--out", str(tmp_path / "bad"), flag, value])
        assert bad.exit_code == 2 and flag in bad.output, (flag, value)
    assert not (tmp_path / "bad").exists()  # refused before anything ran


def test_with_tests_is_recorded_and_every_later_phase_must_agree(tmp_path):
    from fastblt.cli.train import train

    threads = torch.get_num_threads()
    res = CliRunner().invoke(train, ["--smoke", "--out", str(tmp_path), "--phase", "baseline", "--with-tests"])
    torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "corpus.json").read_text())
    assert record == {"test_dirs": True, "heldout_list_sha256": heldout_list_digest()}
    bad = CliRunner().invoke(train, ["--smoke", "--out", str(tmp_path), "--phase", "report"])
    assert bad.exit_code == 2 and "corpus.json" in bad.output and "trained --with-tests" in bad.output
    # a run recorded under another held-out list (here: the list before 2026-12-03) trained on other files
    (tmp_path / "corpus.json").write_text(json.dumps(record | {"heldout_list_sha256": "0" * 64}))
    bad = CliRunner().invoke(train, ["--smoke", "--out", str(tmp_path), "--phase", "report", "--with-tests"])
    assert bad.exit_code == 2 and "another held-out list" in bad.output


def test_default_plan_gives_the_baseline_the_blt_ds_whole_training_time():
    from fastblt.train.loop import default_plan

    plan = default_plan(135, 10, None)
    assert plan.base.minutes == 145 and plan.blt.minutes == 135 and plan.entropy.minutes == 10
    assert default_plan(135, 10, 30).base.minutes == 30
    assert plan.checkpoint_dtype == "float16"


def test_report_with_the_baseline_states_its_numbers_and_recipe(smoke_run, tmp_path):
    import shutil

    from fastblt.cli.train import train

    out = tmp_path / "run"
    shutil.copytree(smoke_run, out)
    blt = json.loads((out / "blt" / "result.json").read_text())
    blt["sittings"].append(blt["sittings"][0] | {"from_step": 20, "from_s": 90.0, "bf16": False, "threads": 2})
    (out / "blt" / "result.json").write_text(json.dumps(blt))  # as if resumed at step 20 in fp32 on 2 threads
    threads = torch.get_num_threads()
    for phase in ("baseline", "report"):
        args = ["--smoke", "--out", str(out), "--phase", phase, "--baseline-lr", "0.013", "--precision", "bf16"]
        args += _threads()
        res = CliRunner().invoke(train, args)
        assert res.exit_code == 0, res.output
    torch.set_num_threads(threads)
    report = json.loads((out / "report.json").read_text())
    base = report["baseline"]
    assert base["phase"]["lr"] == 0.013 and base["heldout"]["bpb"] > 0
    md = (out / "REPORT.md").read_text()
    assert f"| plain byte transformer, same wall clock | {base['params']:,} | {base['heldout']['bpb']:.3f} |" in md
    assert "peak lr 0.013, bf16 autocast forward passes" in md  # the smoke plan's precision and init
    assert "PyTorch's default initialisation, trained on the same windows" in md
    assert "BLT-D trained in 2 sittings: from step 0 (0.0 min) on " in md
    assert ", bf16 autocast, 1 thread(s); from step 20 (1.5 min) on " in md
    assert "fp32, 2 thread(s)." in md and "baseline byte LM trained in" not in md
    assert "torch threads per process: 1 then 2;" in md  # the method line follows the sittings
    assert "at equal training time it" in md
    files = report["blt_d"]["bits_by_file"]["files"]
    assert files and all("baseline" in f["bpb"] for f in files)


def test_notes_phase_puts_notes_md_into_the_report_and_changes_nothing_else(smoke_run, tmp_path):
    import shutil

    from fastblt.cli import cli

    out = tmp_path / "run"
    shutil.copytree(smoke_run, out)
    before = json.loads((out / "report.json").read_text())
    (out / "notes.md").write_text("**Result.** the notes, written once the numbers were known\n")
    res = CliRunner().invoke(cli, ["train", "--out", str(out), "--phase", "notes"])
    assert res.exit_code == 0, res.output
    assert f"re-rendered with the notes of {out / 'notes.md'}" in res.output
    after = json.loads((out / "report.json").read_text())
    assert after.pop("notes") == "**Result.** the notes, written once the numbers were known"
    assert after == {k: v for k, v in before.items() if k != "notes"}
    md = (out / "REPORT.md").read_text()
    assert "## Notes\n\n**Result.** the notes, written" in md and before["checkpoint_hash"] in md
    (out / "notes.md").unlink()  # removed notes leave the report
    res = CliRunner().invoke(cli, ["train", "--out", str(out), "--phase", "notes"])
    assert res.exit_code == 0 and "without notes" in res.output
    assert "## Notes" not in (out / "REPORT.md").read_text()


def test_notes_phase_without_a_report_says_so(tmp_path):
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "fastblt.cli", "train", "--out", str(tmp_path / "none"), "--phase", "notes"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"error: {tmp_path / 'none' / 'report.json'}: no report to add notes to; "
        "run `fastblt train --phase report` first"
    )
    assert not (tmp_path / "none").exists()


def test_latent_use_reads_the_trained_path_and_changes_when_the_latent_does(smoke_run):
    from fastblt.train.blt_d import eval_bpb
    from fastblt.train.loop import blt_forward
    from fastblt.train.report import latent_use, load_final_model

    model = load_final_model(smoke_run)
    torch.manual_seed(0)
    windows = torch.randint(4, 260, (3, 97))
    windows[:, 0] = 1
    u = latent_use(model, windows)
    assert abs(u["bpb_fresh_latent"] - eval_bpb(blt_forward(model), windows)["bpb"]) < 1e-4
    assert abs(u["bpb_fresh_latent"] - u["bpb_zero_latent"]) > 1e-4  # the trained decoder reads it
    with torch.no_grad():  # a decoder blind to the latent scores the same whatever it reads
        for xattn in model.local_decoder.cross_attn_layers:
            xattn.wo.weight.zero_()
    blind = latent_use(model, windows)
    assert abs(blind["bpb_fresh_latent"] - blind["bpb_stale_latent"]) < 1e-6
    assert abs(blind["bpb_fresh_latent"] - blind["bpb_zero_latent"]) < 1e-6 and blind["greedy_agree_fresh_stale"] == 1
    report = json.loads((smoke_run / "report.json").read_text())
    assert set(report["blt_d"]["latent_use"]) == set(u)
    assert "### Does the decoder use the global model?" in (smoke_run / "REPORT.md").read_text()


def test_decoder_scales_measure_the_stream_the_latent_has_to_move(smoke_run):
    from fastblt.train.report import decoder_scales, load_final_model

    model = load_final_model(smoke_run)
    torch.manual_seed(0)
    windows = torch.randint(4, 260, (3, 97))
    windows[:, 0] = 1
    rows = decoder_scales(model, windows)
    assert [r["layer"] for r in rows] == list(range(model.config.decoder.n_layers))
    with torch.no_grad():  # the stream entering the first cross-attention is the encoder's output
        h = model.encode(windows)
    assert abs(rows[0]["stream_in"] - float(h.pow(2).mean(-1).sqrt().mean())) < 1e-4 * rows[0]["stream_in"]
    assert all(r["cross_attn_adds"] > 0 and r["ffn_adds"] > 0 for r in rows)
    with torch.no_grad():
        model.local_decoder.cross_attn_layers[0].wo.weight.zero_()
    assert decoder_scales(model, windows)[0]["cross_attn_adds"] == 0
    assert not any(m._forward_hooks for m in model.modules())  # the hooks are gone
    report = json.loads((smoke_run / "report.json").read_text())
    assert len(report["blt_d"]["decoder_scales"]) == len(rows)
    assert "| decoder layer | stream entering | cross-attention adds |" in (smoke_run / "REPORT.md").read_text()


def test_the_global_transformer_trains_at_its_lr_multiplier_and_the_rest_at_the_peak_lr():
    from fastblt.model.blt import BltModel
    from fastblt.train.loop import make_optimizer, smoke_plan

    plan = smoke_plan()
    model = BltModel(plan.model)
    pc = dataclasses.replace(plan.blt, global_lr_mult=0.25)
    opt = make_optimizer(model, pc)
    mult = {id(p): g["lr_mult"] for g in opt.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert mult[id(p)] == (0.25 if name.startswith("global_transformer.") else 1.0), name
        assert decay[id(p)] == (pc.weight_decay if p.dim() >= 2 else 0.0), name
    assert len(mult) == sum(1 for _ in model.parameters())


def test_hash_dropout_drops_whole_table_rows_per_byte_and_is_off_by_default():
    from fastblt.model.blt import BltModel
    from fastblt.model.hashing import hash_ids_torch
    from fastblt.train.loop import smoke_plan

    plan = smoke_plan()
    model = BltModel(plan.model)
    tokens = torch.randint(4, 260, (2, 400))
    ids = hash_ids_torch(tokens, plan.model)
    full = model.embed(tokens, ids)
    assert torch.equal(model.embed(tokens, ids, 0.0), full) and plan.blt.hash_dropout == 0.0
    p = 0.25
    dropped = model.embed(tokens, ids, p, torch.Generator().manual_seed(0))
    # every byte's embedding = byte row + (kept hash rows) / (1 - p): recover which rows were kept
    byte_rows = model.local_encoder.tok_embeddings(tokens)
    rows = torch.stack([t(ids[..., i]) for i, t in enumerate(model.encoder_hash_tok_embedding)], -2)  # (B, N, T, d)
    n_tables = rows.shape[-2]
    masks = torch.tensor([[(m >> i) & 1 for i in range(n_tables)] for m in range(2**n_tables)], dtype=rows.dtype)
    cands = byte_rows.unsqueeze(-2) + torch.einsum("mt,bntd->bnmd", masks, rows) / (1 - p)  # (B, N, 2^T, d)
    err, best = (cands - dropped.unsqueeze(-2)).detach().abs().amax(-1).min(-1)
    assert float(err.max()) < 1e-5  # each byte is exactly some subset of its rows, rescaled
    kept = masks[best].mean()
    assert abs(float(kept) - (1 - p)) < 0.03  # about 1 - p of the rows survive
    again = model.embed(tokens, ids, p, torch.Generator().manual_seed(0))
    assert torch.equal(again, dropped)  # the trainer's generator decides (resume replays it)


@pytest.mark.parametrize("bf16", [True, False])
def test_a_phase_runs_its_forward_passes_under_bf16_autocast_only_when_asked(tmp_path, bf16):
    from fastblt.model.blt import EntropyModel
    from fastblt.model.config import VOCAB_SIZE
    from fastblt.train.blt_d import lm_loss
    from fastblt.train.loop import run_phase, smoke_plan

    plan = smoke_plan()
    model = EntropyModel(plan.baseline, VOCAB_SIZE)
    pc = dataclasses.replace(plan.base, max_steps=2, bf16=bf16)
    seen = []

    def step(x, g):
        seen.append(torch.is_autocast_enabled("cpu"))
        logits = model(x)
        seen.append(logits.dtype)  # the model's logits are fp32 either way
        return lm_loss(logits, x), {}

    corpus = Corpus.load(limit_bytes=50_000)
    run_phase("t", model, pc, step, corpus, lambda: {}, tmp_path, seed=0, resume=False)
    assert seen == [bf16, torch.float32] * 2
    assert not torch.is_autocast_enabled("cpu")


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme avx avx2 avx512f {extra} rdrand
"""


@pytest.mark.parametrize(("extra", "native"), [("", False), ("avx512_bf16", True), ("amx_bf16 amx_tile", True)])
def test_native_bf16_is_read_from_the_cpu_flags(extra, native):
    from fastblt.train.loop import cpu_description, cpu_has_native_bf16

    info = CPUINFO.format(extra=extra)
    assert cpu_has_native_bf16(info) is native
    assert cpu_has_native_bf16("model name : avx512_bf16 in a name is not a flag\n") is False
    cpu = cpu_description(info)
    assert cpu["model"] == "Intel(R) Xeon(R) Platinum 8480+" and cpu["native_bf16"] is native


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_the_cpu_and_an_explicit_choice_wins(monkeypatch, native):
    from fastblt.train import loop as T

    monkeypatch.setattr(T, "cpu_has_native_bf16", lambda cpuinfo=None: native)
    plan = T.with_precision(T.default_plan(10, 1, None), bf16=not native)  # auto must not keep what it finds
    for asked, want in (("auto", native), ("bf16", True), ("fp32", False)):
        got = T.resolve_precision(plan, asked)
        assert [got.entropy.bf16, got.blt.bf16, got.base.bf16] == [want] * 3, asked
    with pytest.raises(ValueError, match="precision 'fp8'"):
        T.resolve_precision(plan, "fp8")


def test_train_says_which_precision_runs_and_records_the_cpu(monkeypatch, tmp_path):
    from fastblt.cli.train import _precision_words, train
    from fastblt.train import loop as T
    from fastblt.train.report import cpus_words

    monkeypatch.setattr(T, "cpu_has_native_bf16", lambda cpuinfo=None: False)
    threads = torch.get_num_threads()
    res = CliRunner().invoke(train, ["--smoke", "--out", str(tmp_path), "--phase", "baseline", *_threads()])
    torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    assert "fp32 forward passes (--precision auto: this CPU has no native bf16)" in res.stderr
    result = json.loads((tmp_path / "baseline" / "result.json").read_text())
    assert result["phase"]["bf16"] is False
    (sitting,) = result["sittings"]
    assert sitting["cpu"] == T.cpu_description() and sitting["cpu"]["native_bf16"] is False
    assert sitting["bf16"] is False and sitting["threads"] == 1
    assert "no native bf16" in cpus_words(result["sittings"]) and cpus_words([]) == "not recorded"
    forced = _precision_words("bf16", bf16=True, native=False)  # the user's choice stands, with a warning
    want = "bf16 autocast forward passes (as asked; this CPU has no native bf16, so steps run ~10x slower than "
    assert forced == want + "with --precision fp32)"
    assert _precision_words("fp32", bf16=False, native=True) == "fp32 forward passes (as asked)"


def test_a_resumed_phase_records_each_sitting_and_the_report_names_them(tmp_path):
    from fastblt.model.blt import EntropyModel
    from fastblt.model.config import VOCAB_SIZE
    from fastblt.train.loop import byte_lm_step, run_phase, smoke_plan
    from fastblt.train.report import cpus_words, sittings_words

    plan = smoke_plan()
    model = EntropyModel(plan.baseline, VOCAB_SIZE)
    pc = dataclasses.replace(plan.base, max_steps=4, ckpt_every_s=0.0, bf16=False)  # a checkpoint every step
    loss, calls = byte_lm_step(model), []

    def crashes_at_step_3(x, g):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return loss(x, g)

    corpus = Corpus.load(limit_bytes=50_000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with pytest.raises(RuntimeError, match="interrupted"):
            run_phase("t", model, pc, crashes_at_step_3, corpus, lambda: {}, tmp_path, seed=0, resume=False)
        torch.set_num_threads(2)  # the second sitting runs differently
        st = run_phase("t", model, pc, loss, corpus, lambda: {}, tmp_path, seed=0, resume=True)
    finally:
        torch.set_num_threads(threads)
    assert st["step"] == 4
    first, second = st["sittings"]
    assert (first["from_step"], first["threads"], second["from_step"], second["threads"]) == (0, 1, 2, 2)
    assert second["from_s"] > 0 and "from step 2 (" in sittings_words(st["sittings"])
    assert cpus_words(st["sittings"]).count("cores") == 1  # the same CPU twice is named once
    again = run_phase("t", model, pc, loss, corpus, lambda: {}, tmp_path, seed=0, resume=True)
    assert len(again["sittings"]) == 2  # resuming a finished phase trains nothing and adds no sitting
