"""The runtime over onnxruntime: exactness across backends, first-use export, artifact checks.

The tiny model's export is cached in pytest's cache directory (keyed by the model's hash, as the
Generator keys its own cache), so only the first run of the suite pays for the ONNX export.
"""

from __future__ import annotations

import copy
import os
import threading
import time

import pytest
import torch
from runtime_refs import PROMPTS, full_recompute_greedy, tiny_model, torch_generator

from fastblt.engines.registry import available
from fastblt.errors import ManifestMismatch
from fastblt.export.spec import DEFAULT_MAX_STEP
from fastblt.runtime.generator import Generator

pytestmark = pytest.mark.skipif(not available()["ort"].available, reason="onnxruntime is not installed")
N = 40


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fastblt-runtime-exports")


@pytest.fixture(scope="session")
def ort_gen(export_cache) -> Generator:
    """Exports on first use (artifacts=None) into the cache directory."""
    return Generator(tiny_model(), backend="ort", threads=1, cache_dir=export_cache)


def test_first_use_export_lands_in_the_cache(ort_gen, export_cache):
    manifests = list(export_cache.glob(f"*/float32-step{DEFAULT_MAX_STEP}/manifest.json"))
    assert manifests and ort_gen.engine.backend.artifacts_dir in [m.parent for m in manifests]
    assert ort_gen.engine.max_step == DEFAULT_MAX_STEP


@pytest.mark.parametrize("prompt", PROMPTS[:4])
def test_greedy_ar_ort_equals_torch_equals_full_recompute(ort_gen, prompt):
    want = full_recompute_greedy(tiny_model(), prompt, N, stop_on_eos=False)
    assert torch_generator().generate(prompt, mode="ar", max_bytes=N, stop_on_eos=False).ids == want
    assert ort_gen.generate(prompt, mode="ar", max_bytes=N, stop_on_eos=False).ids == want


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_greedy_blt_s_on_ort_equals_ar(ort_gen, k):
    for prompt in PROMPTS:
        ar = ort_gen.generate(prompt, mode="ar", max_bytes=N, stop_on_eos=False).ids
        assert ort_gen.generate(prompt, mode="blt-s", max_bytes=N, k=k, stop_on_eos=False).ids == ar


@pytest.mark.parametrize(("unmask", "block_start"), [("one-step", "force"), ("confidence", "patch")])
def test_greedy_blt_dv_on_ort_equals_ar(ort_gen, unmask, block_start):
    for prompt in PROMPTS:
        ar = ort_gen.generate(prompt, mode="ar", max_bytes=N, stop_on_eos=False).ids
        got = ort_gen.generate(
            prompt, mode="blt-dv", max_bytes=N, unmask=unmask, block_start=block_start, stop_on_eos=False
        )
        assert got.ids == ar


def test_blt_d_on_ort_equals_torch(ort_gen):
    for prompt in PROMPTS[:3]:
        for block_start in ("force", "patch"):
            kw = dict(mode="blt-d", max_bytes=N, block_start=block_start, stop_on_eos=False)
            assert ort_gen.generate(prompt, **kw).ids == torch_generator().generate(prompt, **kw).ids


def test_explicit_artifacts_and_their_checks(ort_gen, tmp_path):
    from fastblt.formats.checkpoint import save_checkpoint

    arts = ort_gen.engine.backend.artifacts_dir
    g = Generator(tiny_model(), backend="ort", artifacts=arts, threads=1)  # the manifest decides max_step
    assert g.engine.max_step == DEFAULT_MAX_STEP
    assert g.generate("abc", mode="ar", max_bytes=8).ids == ort_gen.generate("abc", mode="ar", max_bytes=8).ids
    other = copy.deepcopy(tiny_model())  # same config, other weights: caught by the probe
    with torch.no_grad():
        other.local_decoder.output.weight.mul_(1.5)
    with pytest.raises(ManifestMismatch, match="do not compute this model"):
        Generator(other, backend="ort", artifacts=arts)
    with pytest.raises(ManifestMismatch, match="checkpoint.config"):
        Generator(tiny_model("small-window"), backend="ort", artifacts=arts)
    ckpt = save_checkpoint(tiny_model(), tmp_path / "ckpt")  # a directory: hashes must agree
    with pytest.raises(ManifestMismatch, match="checkpoint.hash"):
        Generator(ckpt, backend="ort", artifacts=arts)
    with pytest.raises(ManifestMismatch, match="no manifest"):
        Generator(tiny_model(), backend="ort", artifacts=tmp_path)


def test_threads_share_an_ort_generator_safely(ort_gen):
    """ORT output buffers are shared per backend: the per-backend lock and the state's copies keep
    concurrent calls apart."""
    jobs = [(p, m) for p in PROMPTS[:2] for m in ("ar", "blt-s", "blt-dv", "blt-d")]
    want = {job: ort_gen.generate(job[0], mode=job[1], max_bytes=24, stop_on_eos=False).ids for job in jobs}
    got: dict = {}

    def worker(job):
        got[job] = ort_gen.generate(job[0], mode=job[1], max_bytes=24, stop_on_eos=False).ids

    threads = [threading.Thread(target=worker, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_closing_a_generator_waits_for_the_step_calls_in_flight(export_cache):
    """close() releases the sessions between step calls, never under one: calls running on other
    threads finish with their bytes (their next step loads the sessions again)."""
    g = Generator(tiny_model(), backend="ort", threads=1, cache_dir=export_cache)
    want = g.generate(PROMPTS[0], mode="blt-s", max_bytes=40, stop_on_eos=False).ids
    got, errors, running = [], [], threading.Event()

    def worker() -> None:
        running.set()
        for _ in range(4):
            try:
                got.append(g.generate(PROMPTS[0], mode="blt-s", max_bytes=40, stop_on_eos=False).ids)
            except Exception as e:  # noqa: BLE001 (the assertion shows it)
                errors.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    running.wait()
    closes = 0
    while any(t.is_alive() for t in threads):
        g.close()
        closes += 1
        time.sleep(0.08)  # a few generations' steps between closes: closing every step call leaves little else
    for t in threads:
        t.join()
    assert errors == [] and got == [want] * 12 and closes >= 3


@pytest.mark.parametrize("pad_work", [1.0, float("inf")])
def test_batched_requests_on_ort_equal_batch_one(ort_gen, monkeypatch, pad_work):
    """onnxruntime computes each row of a batched call as it computes the row alone: mixed modes,
    prompts and seeded sampling in batches of 6 give every request its batch-1 bytes, with the
    global steps over row ranges where padding is cheap (the default) or always."""
    from fastblt.runtime import calls
    from fastblt.runtime.batch import BatchEngine
    from fastblt.runtime.options import make_request

    monkeypatch.setattr(calls, "PAD_WORK", pad_work)

    jobs = [(p, m, n) for n, p in zip((9, 17, 30), PROMPTS, strict=False) for m in ("ar", "blt-s", "blt-d", "blt-dv")]
    jobs += [(PROMPTS[4], "ar", 25)] * 3
    sampled = {"temperature": 0.8, "seed": 7}
    want = [ort_gen.generate(p, mode=m, max_bytes=n, stop_on_eos=False, **(sampled if i % 3 == 0 else {})).ids
            for i, (p, m, n) in enumerate(jobs)]  # fmt: skip
    with BatchEngine(ort_gen.engine, max_batch=6) as batch:
        tickets = [
            batch.submit(make_request(p, ort_gen.config, m, n, stop_on_eos=False, **(sampled if i % 3 == 0 else {})))
            for i, (p, m, n) in enumerate(jobs)
        ]
        got = [t.result(120).ids for t in tickets]
        assert batch.stats.rows["decoder"] > batch.stats.calls["decoder"]
    assert got == want


def test_a_padded_global_step_on_ort_is_bit_exact(ort_gen):
    """A row of a global call padded with another row's patches and a wider gathered cache writes
    exactly what it writes alone."""
    from test_batch import padded_global_step

    a, alone = padded_global_step(ort_gen)
    for (k, v), (k1, v1) in zip(a.linear["global"].kv, alone.linear["global"].kv, strict=True):
        assert torch.equal(k[:, :, 62], k1[:, :, 62]) and torch.equal(v[:, :, 62], v1[:, :, 62])
    for (k, v), (k1, v1) in zip(a.rows.cross, alone.rows.cross, strict=True):
        slot = 62 % k.shape[2]
        assert torch.equal(k[0, :, slot], k1[0, :, slot]) and torch.equal(v[0, :, slot], v1[0, :, slot])


@pytest.mark.parametrize("mode", ["ar", "blt-s"])
def test_the_host_side_of_a_byte_makes_few_torch_calls(ort_gen, mode):
    """Right after a step call has evicted the core's caches a small torch call costs 10-20 us and
    a numpy one ~2 us, so between step calls the runtime works on numpy views (caches.host_arrays)
    and the backend looks at a tensor it was fed before without reading its attributes. A byte made
    ~34 torch calls before that; a handful are left (a global step's patch bytes and outputs)."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    ort_gen.generate(PROMPTS[0], mode=mode, max_bytes=8, stop_on_eos=False)  # buffers and bindings made
    with Count():
        out = ort_gen.generate(PROMPTS[0], mode=mode, max_bytes=64, stop_on_eos=False)
    assert len(out.ids) == 64
    assert Count.calls / 64 <= 10, f"{Count.calls / 64:.1f} torch calls per byte"


def test_the_torch_host_path_computes_what_the_numpy_path_does(ort_gen, export_cache, monkeypatch):
    """Off the host (CUDA) or in bfloat16 a sequence's byte states, float inputs and gathered caches
    stay torch tensors (caches.host_arrays); forced onto that path on the CPU, every mode and a
    batch of mixed requests give the bytes the numpy path gives."""
    from fastblt.runtime import caches, calls, state
    from fastblt.runtime.batch import BatchEngine
    from fastblt.runtime.options import make_request

    jobs = [(p, m) for p in PROMPTS[:3] for m in ("ar", "blt-s", "blt-d", "blt-dv")]
    want = [ort_gen.generate(p, mode=m, max_bytes=24, stop_on_eos=False).ids for p, m in jobs]
    for module in (caches, calls, state):
        monkeypatch.setattr(module, "host_arrays", lambda device, dtype: False)
    torch_path = Generator(tiny_model(), backend="ort", threads=1, cache_dir=export_cache)
    st = torch_path.engine.acquire()
    assert not st.numpy and not st.runner.numpy
    torch_path.engine.release(st)
    assert [torch_path.generate(p, mode=m, max_bytes=24, stop_on_eos=False).ids for p, m in jobs] == want
    with BatchEngine(torch_path.engine, max_batch=6) as batch:
        assert not batch.runner.numpy and batch.rows.cross_host is None
        tickets = [batch.submit(make_request(p, torch_path.config, m, 24, stop_on_eos=False)) for p, m in jobs]
        assert [t.result(120).ids for t in tickets] == want


def test_default_threads_spin_only_inside_a_global_call_and_compute_the_same(ort_gen, export_cache):
    """By default the per-byte steps run on one thread and the global step on onnxruntime's pool,
    whose workers spin inside a call and stop when it returns (and flush denormals); the bytes are
    those of one thread."""
    g = Generator(tiny_model(), backend="ort", cache_dir=export_cache)
    try:
        g.generate(PROMPTS[0], mode="ar", max_bytes=4)  # sessions are made on first use
        sessions = g.engine.backend._sessions
        for step, session in sessions.items():
            options = session.get_session_options()
            pool = step == "global"
            assert options.intra_op_num_threads == (0 if pool else 1)
            assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if pool else "0")
            assert options.get_session_config_entry("session.force_spinning_stop") == "1"
            assert options.get_session_config_entry("session.set_denormal_as_zero") == "1"
        for mode in ("ar", "blt-s"):
            want = ort_gen.generate(PROMPTS[1], mode=mode, max_bytes=N).bytes
            assert g.generate(PROMPTS[1], mode=mode, max_bytes=N).bytes == want
    finally:
        g.close()


def test_a_wide_global_session_runs_when_asked_and_computes_the_same(ort_gen, export_cache):
    """widen_global: a second global session on every core, used only while `when()` is true,
    giving the bytes of the one-thread session (what a lane alone relies on)."""
    from fastblt.engines.ort_backend import WIDE

    g = Generator(tiny_model(), backend="ort", threads=1, cache_dir=export_cache)
    try:
        backend, wide = g.engine.backend, [False]
        backend.widen_global(0, lambda: wide[0])
        assert backend._sessions[WIDE].get_session_options().intra_op_num_threads == 0
        runs = {key: 0 for key in ("global", WIDE)}
        for key in runs:
            inner = backend._runs[key]
            backend._runs[key] = lambda inner=inner, key=key: (runs.__setitem__(key, runs[key] + 1), inner())
        want = {mode: ort_gen.generate(PROMPTS[2], mode=mode, max_bytes=N).bytes for mode in ("ar", "blt-s")}
        for flag in (False, True):
            wide[0] = flag
            before = dict(runs)
            for mode in want:
                assert g.generate(PROMPTS[2], mode=mode, max_bytes=N).bytes == want[mode]
            used = WIDE if flag else "global"
            assert runs[used] > before[used] and all(runs[k] == before[k] for k in runs if k != used)
        g.close()  # sessions go; activation makes both again
        g.generate(PROMPTS[2], mode="ar", max_bytes=4)
        assert WIDE in backend._sessions
    finally:
        g.close()


def test_global_threads_follow_the_cores_lent_and_a_lanes_share(ort_gen, export_cache, monkeypatch):
    """The per-byte steps run on one thread; the global step on every core this process may use
    (onnxruntime's own count, 0, only when that is the host's); set_global_threads gives it a lane's
    share, reopening only that session, with the same bytes."""
    from fastblt.engines import ort_backend

    def threads(backend) -> dict[str, int]:
        return {k: s.get_session_options().intra_op_num_threads for k, s in backend._sessions.items()}

    for cores, want in ((os.cpu_count(), 0), (1, 1)):  # all the host's cores; a quota of one
        monkeypatch.setattr(ort_backend, "cpu_cores", lambda cores=cores: cores)
        g = Generator(tiny_model(), backend="ort", cache_dir=export_cache)
        try:
            got = threads(g.engine.backend)
            assert got.pop("global") == want and set(got.values()) == {1}
        finally:
            g.close()
    g = Generator(tiny_model(), backend="ort", threads=1, cache_dir=export_cache)
    try:
        backend = g.engine.backend
        want = ort_gen.generate(PROMPTS[2], mode="ar", max_bytes=N).bytes
        before = dict(backend._sessions)
        backend.set_global_threads(2)
        got = threads(backend)
        assert got.pop("global") == 2 and set(got.values()) == {1}
        assert [k for k in before if backend._sessions[k] is not before[k]] == ["global"]
        assert g.generate(PROMPTS[2], mode="ar", max_bytes=N).bytes == want
        g.close()  # reactivation keeps the share
        g.generate(PROMPTS[2], mode="ar", max_bytes=4)
        assert threads(backend)["global"] == 2
        on_disk = sum(f.stat().st_size for f in backend.artifacts_dir.iterdir() if f.is_file())
        assert 0 < backend.graph_bytes <= on_disk
    finally:
        g.close()


@pytest.mark.parametrize("caller_flushes", [False, True])
def test_a_step_flushes_denormals_and_gives_the_callers_mode_back(ort_gen, export_cache, caller_flushes):
    """Step calls run with denormals flushed to zero (long contexts underflow in attention, and a
    denormal costs a microcode assist per use), on the calling thread only for the call: a caller's
    own floating-point mode is what it was, whether it flushed or not, after loading and stepping."""
    from fastblt.engines.ort_backend import flushes_denormals

    seen = []

    def run():
        torch.set_flush_denormal(caller_flushes)
        try:
            g = Generator(tiny_model(), backend="ort", threads=1, cache_dir=export_cache)
            out = g.generate(PROMPTS[0], mode="ar", max_bytes=8)  # makes the sessions, then steps
            seen.append(flushes_denormals())
            runs = g.engine.backend._runs
            inside = []
            for step, call in list(runs.items()):
                runs[step] = lambda call=call: (inside.append(flushes_denormals()), call())
            g.generate(PROMPTS[0], mode="ar", max_bytes=8)
            seen.append(flushes_denormals())  # after stepping
            seen.append(all(inside) and len(inside) > 0)
            seen.append(out.bytes == ort_gen.generate(PROMPTS[0], mode="ar", max_bytes=8).bytes)
            g.close()
        finally:
            torch.set_flush_denormal(False)

    worker = threading.Thread(target=run)  # a thread of its own: the mode is per thread
    worker.start()
    worker.join()
    assert seen == [caller_flushes, caller_flushes, True, True]


@pytest.mark.parametrize("pad_work", [1.0, float("inf")])
def test_prompt_snapshots_of_batch_rows_on_ort_are_bit_exact(ort_gen, export_cache, monkeypatch, pad_work):
    """Requests in rows past the first keep snapshots of their prompts, and requests of those
    prompts load them into other rows: every score equals, to the bit, a Generator's that commits
    every prompt itself (onnxruntime computes a batched row as the row alone), with the global
    steps over row ranges where padding is cheap (the default) or always."""
    from fastblt.runtime import calls
    from fastblt.runtime.batch import BatchEngine
    from fastblt.runtime.options import make_request

    monkeypatch.setattr(calls, "PAD_WORK", pad_work)

    plain = Generator(tiny_model(), backend="ort", threads=1, cache_dir=export_cache, prompt_cache_mb=0)
    text = (PROMPTS[5] * 3 + PROMPTS[3] * 20).encode()
    long = [bytes([65 + i]) + text[:600] for i in range(3)]  # kept at 512 and at their cuts
    work = [(PROMPTS[0], "blt-d", 40)] + [(p, m, 24) for p in long for m in ("ar", "blt-s", "blt-dv")]
    turns = [(p + text[::-1][:300], "ar", 24) for p in long]  # the next turns: they load the snapshots at 512
    ort_gen.engine.prompts.clear()
    hits = ort_gen.engine.prompts.stats.hits
    for jobs in (work, work + turns):  # the first pass keeps snapshots, the second loads them
        options = [{"stop_on_eos": False} | ({} if m == "blt-d" else {"logprobs": 1}) for _, m, _ in jobs]
        want = [plain.generate(p, mode=m, max_bytes=n, **o) for (p, m, n), o in zip(jobs, options, strict=True)]
        with BatchEngine(ort_gen.engine, max_batch=4) as batch:
            tickets = [batch.submit(make_request(p, ort_gen.config, m, n, **o))
                       for (p, m, n), o in zip(jobs, options, strict=True)]  # fmt: skip
            got = [t.result(120) for t in tickets]
        assert [(g.ids, g.logprobs) for g in got] == [(w.ids, w.logprobs) for w in want]
    assert [g.stats.prompt_cached for g in got[-3:]] == [512] * 3
    assert ort_gen.engine.prompts.stats.hits >= hits + 6
