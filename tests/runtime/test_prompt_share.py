"""Prompt snapshots shared by an engine's lanes through files: a lane loads a snapshot another lane
kept and computes exactly what committing the prompt would have; files are written whole, owned by
the lane that wrote them, removed with its snapshot, and never trusted beyond their header."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from runtime_refs import tiny_model
from test_prompt_cache import LONG, MODES, NEXT, OTHER, plain_generator

from fastblt.errors import InputError
from fastblt.formats.checkpoint import save_checkpoint
from fastblt.model.tokenizer import encode
from fastblt.runtime import prompt_share
from fastblt.runtime.async_engine import AsyncEngine
from fastblt.runtime.generator import Generator
from fastblt.runtime.options import make_request
from fastblt.runtime.prompt_cache import Kept, PromptCache, PromptScores, cut
from fastblt.runtime.prompt_share import DIR_PREFIX, SnapshotFiles, remove_orphans, share_dir


def lane(directory, i: int, mb: float = 64) -> Generator:
    """A Generator standing for lane i of an engine whose snapshot files are in `directory`."""
    g = Generator(tiny_model(), backend="torch", max_context=2048, prompt_cache_mb=mb)
    g.engine.prompts = PromptCache(mb, SnapshotFiles(directory, i))
    return g


def snapshot(ids: bytes = LONG) -> Kept:
    g = plain_generator()
    st = g.engine.acquire()
    try:
        st.run(st.prefill(encode(ids), 32))
        return Kept(st.save())
    finally:
        g.engine.release(st)


def arrays(kept: Kept) -> list:
    return [a for _, a in prompt_share._arrays(kept)]


def test_a_snapshot_another_lane_kept_is_loaded_and_computes_the_same(tmp_path):
    """Lane 1 loads the snapshots lane 0 kept (the same prompt in every mode, greedy and sampled;
    the next turn at the stride point) and keeps none of its own for them; each output equals, to
    the bit, a Generator's without snapshots."""
    plain, a, b = plain_generator(), lane(tmp_path, 0), lane(tmp_path, 1)
    a.generate(LONG, mode="ar", max_bytes=4)
    assert a.engine.prompts.stats.stored == 2 and len(list(tmp_path.iterdir())) == 2
    q = cut(len(LONG) + 1, a.engine.max_step)
    for mode in MODES:
        for options in ({}, {"temperature": 0.9, "seed": 3}):
            options = options | {"max_bytes": 24, "stop_on_eos": False} | ({} if mode == "blt-d" else {"logprobs": 1})
            want, out = plain.generate(LONG, mode=mode, **options), b.generate(LONG, mode=mode, **options)
            assert out.ids == want.ids and out.logprobs == want.logprobs, (mode, options)
            assert out.stats.prompt_cached == q
    stats = b.engine.prompts.stats
    assert (stats.hits, stats.shared_hits, stats.stored, stats.bytes) == (8, 8, 0, 0)  # lane 0's files serve it
    out = b.generate(NEXT, mode="ar", max_bytes=16, stop_on_eos=False)
    assert out.ids == plain.generate(NEXT, mode="ar", max_bytes=16, stop_on_eos=False).ids
    assert out.stats.prompt_cached == 512 and stats.shared_hits == 9


def test_scored_snapshots_across_lanes(tmp_path):
    """A lane scoring its prompt loads another lane's file only if it carries as many top ids or
    more (its scores cut to the request's, to the bit); with more it commits and keeps its own
    snapshot in memory (the file stays the other lane's); a file's owner replaces it with one
    carrying more."""
    plain, a, b, c = plain_generator(), lane(tmp_path, 0), lane(tmp_path, 1), lane(tmp_path, 2)
    calls = [(a, LONG, 2, 0), (b, LONG[:-1] + b"?", 1, 672), (b, LONG, 3, 0), (a, LONG, 3, 0), (c, LONG, 3, 672)]
    for g, prompt, n, loaded in calls:
        options = {"max_bytes": 8, "stop_on_eos": False, "prompt_logprobs": n}
        want, out = plain.generate(prompt, mode="ar", **options), g.generate(prompt, mode="ar", **options)
        assert out.stats.prompt_cached == loaded, (prompt[-4:], n)
        assert out.prompt_logprobs == want.prompt_logprobs and out.prompt_top_logprobs == want.prompt_top_logprobs
    assert [g.engine.prompts.stats.shared_hits for g in (a, b, c)] == [0, 1, 1]
    assert [g.engine.prompts.stats.stored for g in (a, b, c)] == [4, 2, 0]
    assert sorted(prompt_share._header(f)["rank"] for f in tmp_path.iterdir()) == [3, 3]


def test_published_files_round_trip_and_belong_to_their_lane(tmp_path):
    kept = snapshot()
    scored = Kept(kept.snap, PromptScores(np.linspace(-3, 0, 5), np.arange(10, dtype=np.int32).reshape(5, 2),
                                          np.full((5, 2), -0.5)))  # fmt: skip
    a, b = SnapshotFiles(tmp_path, 0), SnapshotFiles(tmp_path, 1)
    mapped = a.publish(b"k", kept)
    assert mapped is not None and (tmp_path / b"k".hex()).is_file()
    for x, y in zip(arrays(mapped), arrays(kept), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y) if torch.is_tensor(x) else np.array_equal(x, y)
    assert mapped.nbytes() == kept.nbytes() and mapped.rank == -1
    assert a.find(b"k") is None  # its own: the cache holds it
    found = b.find(b"k")
    assert found is not None and np.array_equal(found.snap.host["tokens"], kept.snap.host["tokens"])
    assert b.find(b"k", top_n=1) is None and b.serves(b"k", -1) and not b.serves(b"k", 1)
    size, cache = kept.nbytes(), PromptCache(64, b)  # a lane that committed the same prompt meanwhile
    assert not cache.wants(b"k", size) and cache.wants(b"k", size, 1) and cache.wants(b"j", size)
    assert b.publish(b"k", scored) is None  # lane 0's file stays
    assert a.publish(b"k", scored).rank == 2 and b.find(b"k", top_n=2).scores.top_n == 2  # the owner replaces its own
    found = b.find(b"k", top_n=2)
    assert np.array_equal(found.scores.top_ids, scored.scores.top_ids)
    b.remove(b"k")  # not lane 1's
    assert (tmp_path / b"k".hex()).is_file()
    a.remove(b"k")
    assert not (tmp_path / b"k".hex()).exists() and torch.equal(found.snap.h, kept.snap.h)  # still mapped
    assert a.find(b"x") is None and b.serves(b"x", -1) is False


def test_files_that_are_not_whole_snapshots_are_ignored(tmp_path):
    a, b = SnapshotFiles(tmp_path, 0), SnapshotFiles(tmp_path, 1)
    a.publish(b"k", snapshot())
    data = (tmp_path / b"k".hex()).read_bytes()
    bad_files = [b"", b"not a snapshot", data[: len(data) // 2], data[:-10], prompt_share.MAGIC + b"\xff" * 16,
                 data.replace(b'"n":', b'"m":')]  # fmt: skip
    for i, bad in enumerate(bad_files):
        (tmp_path / f"{i:02x}").write_bytes(bad)
        assert b.find(bytes([i])) is None and not b.serves(bytes([i]), -1), i


def test_a_restarted_lane_removes_what_its_last_worker_left(tmp_path):
    SnapshotFiles(tmp_path, 0).publish(b"a", snapshot())
    SnapshotFiles(tmp_path, 1).publish(b"b", snapshot())
    (tmp_path / "cc.0.tmp").write_bytes(b"half")
    SnapshotFiles(tmp_path, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [b"b".hex()]


def test_eviction_removes_files_and_spares_one_another_lane_loaded(tmp_path):
    kept = snapshot()
    size = kept.nbytes()
    cache = PromptCache(4.5 * size / 2**20, SnapshotFiles(tmp_path, 0))
    other = SnapshotFiles(tmp_path, 1)
    for key in (b"a", b"b", b"c", b"d"):
        cache.put(key, kept)
    held = cache.peek(b"a").snap  # the file's mapping, not a second copy
    assert held is not kept.snap and held.h.data_ptr() != kept.snap.h.data_ptr() and torch.equal(held.h, kept.snap.h)
    os.utime(tmp_path / b"a".hex(), (1, 1))  # before the cache's own use: not spared for that
    cache.put(b"e", kept)
    assert b"a" not in cache and not (tmp_path / b"a".hex()).exists()
    assert other.find(b"b") is not None  # lane 1 loads "b": it goes round once more
    cache.put(b"f", kept)
    assert [k in cache for k in (b"b", b"c", b"d", b"e", b"f")] == [True, False, True, True, True]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(k.hex() for k in (b"b", b"d", b"e", b"f"))
    assert cache.stats.bytes == 4 * size
    cache.clear()
    assert list(tmp_path.iterdir()) == [] and cache.stats.bytes == 0


def test_room_is_made_before_a_file_is_written(tmp_path, monkeypatch):
    """The files in shared memory stay within the budget too: a lane lets its least recently used
    snapshots go before it writes the next file, not after."""
    kept = snapshot()
    cache = PromptCache(4.5 * kept.nbytes() / 2**20, SnapshotFiles(tmp_path, 0))
    files, write = [], prompt_share._write

    def counted(path, kept, lane):
        write(path, kept, lane)
        files.append(len(list(tmp_path.iterdir())))  # the one just written (under its temporary name) included

    monkeypatch.setattr(prompt_share, "_write", counted)
    for key in (b"a", b"b", b"c", b"d", b"e", b"f"):
        cache.put(key, kept)
    assert files == [1, 2, 3, 4, 4, 4] and len(list(tmp_path.iterdir())) == 4 and cache.stats.evicted == 2


def test_a_snapshot_whose_file_cannot_be_written_stays_in_the_lane(tmp_path, monkeypatch, caplog):
    """/dev/shm full: the lane keeps its snapshots in its own memory and says so once."""

    def full(path, kept, lane):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prompt_share, "_write", full)
    plain, a = plain_generator(), lane(tmp_path, 0)
    with caplog.at_level("WARNING", logger="fastblt.prompts"):
        a.generate(LONG, mode="ar", max_bytes=4)
    out = a.generate(LONG, mode="ar", max_bytes=12, stop_on_eos=False)
    assert list(tmp_path.iterdir()) == [] and a.engine.prompts.stats.stored == 2
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["fastblt lane 0"]  # two failed, told once
    assert "is full" in caplog.records[0].getMessage()
    assert out.stats.prompt_cached > 0
    assert out.ids == plain.generate(LONG, mode="ar", max_bytes=12, stop_on_eos=False).ids


def test_a_file_that_serves_less_than_what_its_lane_keeps_goes(tmp_path, monkeypatch):
    """The owner of a key keeps a snapshot serving more requests it could not write: its file,
    which serves fewer, goes (no other lane loads what this lane no longer holds)."""
    kept = snapshot()
    cache = PromptCache(64, SnapshotFiles(tmp_path, 0))
    cache.put(b"a", kept)
    monkeypatch.setattr(prompt_share, "_write", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    cache.put(b"a", Kept(kept.snap, PromptScores(np.zeros(3), np.zeros((3, 1), np.int32), np.zeros((3, 1)))))
    assert cache.peek(b"a").rank == 1 and list(tmp_path.iterdir()) == []


def test_share_dirs_of_engines_that_are_gone_are_removed(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    space, pid = prompt_share._pid_space(), int(gone.stdout)
    dead, live = tmp_path / f"{DIR_PREFIX}{space}-{pid}-x", tmp_path / f"{DIR_PREFIX}{space}-{os.getpid()}-y"
    elsewhere = tmp_path / f"{DIR_PREFIX}{space + 1}-{pid}-z"  # another PID namespace's: not ours to judge
    for d in (dead, live, elsewhere):
        d.mkdir()
        (d / "f").write_bytes(b"1")
    (tmp_path / "someone-else").mkdir()
    remove_orphans(tmp_path)
    assert not dead.exists() and live.exists() and elsewhere.exists() and (tmp_path / "someone-else").exists()
    mine = share_dir(tmp_path)
    assert mine is not None and mine.name.startswith(f"{DIR_PREFIX}{space}-{os.getpid()}-")
    assert mine.stat().st_mode & 0o777 == 0o700  # this user's alone
    assert share_dir(tmp_path / "missing") is None


@pytest.mark.parametrize("share", [True, False])
def test_worker_lanes_load_each_others_snapshots(tmp_path, share):
    """An AsyncEngine's worker lanes share one directory: a prompt lane 0 took loads on lane 1; the
    directory goes when the engine closes. share_prompts=False: lane 1 commits it."""
    path = save_checkpoint(tiny_model("small-window"), tmp_path / "ckpt")
    eng = AsyncEngine(str(path), backend="ort", max_batch=2, lanes=2, processes=True, cache_dir=tmp_path / "c",
                      share_prompts=share)  # fmt: skip
    try:
        shared = eng.prompt_share_dir
        assert (shared is not None and shared.is_dir()) == share
        req = make_request(LONG, eng.config, "ar", 16, stop_on_eos=False)
        first = eng.lanes[0].submit(req).result(120)
        again = eng.lanes[1].submit(req).result(120)
        other = eng.lanes[1].submit(make_request(OTHER, eng.config, "ar", 16, stop_on_eos=False)).result(120)
        stats = [lane.stats for lane in eng.lanes]
        total = eng.stats.prompt_shared_hits
        want = eng.generator.generate(LONG, mode="ar", max_bytes=16, stop_on_eos=False)
    finally:
        eng.close(30)
    assert first.ids == again.ids == want.ids and other.stats.prompt_cached == 0
    assert (first.stats.prompt_cached, again.stats.prompt_cached) == (0, cut(len(LONG) + 1, 32) if share else 0)
    assert [s.prompt_shared_hits for s in stats] == [0, int(share)] and total == int(share)
    assert shared is None or not shared.exists()
    with pytest.raises(InputError, match="share_prompts: expected True or False"):
        AsyncEngine(tiny_model("small-window"), backend="torch", share_prompts="yes")


@pytest.mark.parametrize("share", [True, False])
def test_thread_lanes_pool_their_snapshots(share):
    """Lanes as threads of one process keep one cache of all their budgets (counted once in the
    engine's stats): a prompt lane 0 took loads on lane 1."""
    eng = AsyncEngine(tiny_model(), backend="torch", max_batch=2, lanes=2, processes=False, prompt_cache_mb=64,
                      share_prompts=share)  # fmt: skip
    try:
        req = make_request(LONG, eng.config, "ar", 16, stop_on_eos=False)
        first, again = eng.lanes[0].submit(req).result(120), eng.lanes[1].submit(req).result(120)
        caches = {id(e.prompts) for e in eng.engines}
        held, total = eng.engines[0].prompts.stats.bytes, eng.stats.prompt_cache_bytes
    finally:
        eng.close(30)
    want = plain_generator().generate(LONG, mode="ar", max_bytes=16, stop_on_eos=False)
    assert first.ids == again.ids == want.ids
    assert (first.stats.prompt_cached, again.stats.prompt_cached) == (0, cut(len(LONG) + 1, 32) if share else 0)
    assert len(caches) == (1 if share else 2) and held > 0 and total == (held if share else 2 * held)
    assert eng.engines[0].prompts.budget == 64 * 2**20 * (2 if share else 1)


def test_an_engine_dropped_without_close_removes_its_directory(tmp_path):
    import gc

    path = save_checkpoint(tiny_model("small-window"), tmp_path / "ckpt")
    eng = AsyncEngine(str(path), backend="ort", max_batch=2, lanes=2, processes=True, cache_dir=tmp_path / "c")
    shared = eng.prompt_share_dir
    assert shared is not None and shared.is_dir()
    del eng
    gc.collect()
    assert not shared.exists()


def test_no_budget_no_files(tmp_path):
    g = lane(tmp_path, 0, 0)
    g.generate(LONG, mode="ar", max_bytes=4)
    assert list(tmp_path.iterdir()) == [] and g.engine.prompts.stats.stored == 0
