"""The bench's prompts come from held-out stdlib files that every Python may not have."""

from __future__ import annotations

import pytest

from fastblt.bench import runtime as bench
from fastblt.errors import InputError
from fastblt.train import corpus


def _fake_stdlib(tmp_path, names):
    for name in names:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x = 1\n" * 40 + b"class A:\n    def method(self):\n        pass\n")
    return tmp_path


def test_missing_bench_files_are_replaced_by_the_next_held_out_files(tmp_path, monkeypatch):
    first, second = bench.BENCH_FILES[:2]
    others = [f for f in corpus.read_heldout_list() if f not in bench.BENCH_FILES][:2]
    root = _fake_stdlib(tmp_path, [first, second, *others])  # the third bench file is missing
    monkeypatch.setattr(corpus, "stdlib_dir", lambda: root)
    prompts = bench.bench_prompts(3, prompt_bytes=100)
    assert [name for name, _ in prompts] == [first, second, others[0]]
    assert all(p.endswith(b"\n    def ") and len(p) == 100 for _, p in prompts)


def test_too_few_held_out_files_is_a_clear_error(tmp_path, monkeypatch):
    root = _fake_stdlib(tmp_path, bench.BENCH_FILES[:1])
    monkeypatch.setattr(corpus, "stdlib_dir", lambda: root)
    with pytest.raises(InputError, match="only 1 of the held-out files exist here; the bench needs 2"):
        bench.bench_prompts(2)
