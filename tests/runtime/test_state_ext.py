"""The runtime's additions to SequenceState: fast hashing, merged force-close, blocks at a given
start, per-state counters, and outputs that are the state's own copies."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_refs import tiny_model

from fastblt.engines.torch_backend import TorchBackend
from fastblt.errors import InputError
from fastblt.export.spec import step_specs
from fastblt.model.hashing import hash_ids_numpy
from fastblt.runtime.state import IncrementalHasher, SequenceState

from tiny import TINY_CONFIGS, random_tokens


def new_state(model, max_step=32):
    return SequenceState(TorchBackend(step_specs(model.config, max_step), model), model.config)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_incremental_hasher_is_bit_exact(name):
    config = tiny_model(name).config
    hasher = IncrementalHasher(config)
    rng = np.random.default_rng(0)
    for _ in range(200):
        hist = rng.integers(0, 262, rng.integers(0, 12))
        toks = rng.integers(0, 262, rng.integers(1, 17))
        want = hash_ids_numpy(toks.reshape(1, -1), config, hist.reshape(1, -1))
        kept = hist[len(hist) - min(len(hist), hasher.pad) :].tolist()
        window = np.array([0] * (hasher.pad - len(kept)) + kept + toks.tolist(), dtype=np.int64)
        assert np.array_equal(hasher(window, len(toks)), want[0])


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_append_close_open_equals_append_then_force_close(name):
    model = tiny_model(name)
    tokens = random_tokens(60, seed=3)[0].numpy()
    a, b = new_state(model), new_state(model)
    for lo, hi in [(0, 17), (17, 21), (21, 22), (22, 40)]:
        la = a.run(a.append(tokens[lo:hi]))
        lb = b.run(b.append(tokens[lo:hi], close_open=True))
        np.testing.assert_allclose(la, lb, rtol=0, atol=1e-5)
        calls = dict(b.calls)
        slot_a, slot_b = a.run(a.force_close()), b.run(b.force_close())
        assert slot_a == slot_b
        assert b.calls == calls  # the latent was already there: no extra global pass
        block = np.array([5, 260, 260, 260])
        block_a, block_b = a.run(a.run_block(block, slot_a)), b.run(b.run_block(block, slot_b))
        np.testing.assert_allclose(block_a, block_b, rtol=0, atol=1e-5)
    # a rollback or a plain append invalidates the merged latent
    b.rollback(30)
    calls = dict(b.calls)
    b.run(b.force_close())
    if b.open_patch_start() < b.n:
        assert b.calls["global"] == calls["global"] + 1


def test_run_block_at_an_earlier_start_equals_rolling_back():
    model = tiny_model("small-window")
    tokens = random_tokens(50, seed=4)[0].numpy()
    st = new_state(model)
    st.run(st.append(tokens[:40]))
    s = 33
    block = np.array([*tokens[s:36], 260, 260, 260])
    read = int(st.closed[s]) - 1
    at_s = st.run(st.run_block(block, read, at=s))
    st.rollback(s)
    assert np.array_equal(st.run(st.run_block(block, read)), at_s)
    with pytest.raises(Exception, match="outside"):
        st.run(st.run_block(block, read, at=st.n + 1))


def test_counters_and_returned_buffers_are_the_states_own():
    model = tiny_model()
    st = new_state(model)
    logits = st.run(st.append(random_tokens(20)[0].numpy()))
    assert st.calls["entropy"] == st.calls["encoder"] == st.calls["decoder"] == 1
    assert st.positions["decoder"] == 20 and st.positions["global"] == st.g_len
    assert isinstance(logits, np.ndarray) and logits.shape == (20, model.config.vocab_size)
    keep = logits.copy()
    st.run(st.append([50]))  # a later step must not change what an earlier one returned
    assert np.array_equal(logits, keep)
    st.reset_counters()
    assert sum(st.calls.values()) == 0 and st.backend_seconds == 0.0


def test_appends_longer_than_max_step_run_in_steps_of_max_step():
    model = tiny_model("small-window")
    tokens = random_tokens(70, seed=6)[0].numpy()
    whole, stepped = new_state(model, max_step=8), new_state(model, max_step=8)
    logits = whole.run(whole.append(tokens))
    assert whole.calls["decoder"] == 9  # 70 positions, 8 per call
    parts = np.concatenate([stepped.run(stepped.append(tokens[i : i + 8])) for i in range(0, 70, 8)])
    assert np.array_equal(logits, parts)


def test_rolling_back_further_than_max_step_is_refused():
    """The rings keep max_step positions past a window: a longer rollback could later show a
    rolled-back entry as an older position, so it is an error (reset starts over instead)."""
    model = tiny_model("small-window")
    tokens = random_tokens(40, seed=7)[0].numpy()
    st = new_state(model, max_step=8)
    st.run(st.append(tokens[:20]))
    st.run(st.append(tokens[20:28]))
    st.rollback(20)  # 8 positions: allowed
    with pytest.raises(InputError, match="max_step = 8"):
        st.rollback(19)  # 9 written positions past it
    st.reset()
    assert st.n == 0 and st.written == 0
    assert np.array_equal(st.run(st.append(tokens[:8])), (b := new_state(model, max_step=8)).run(b.append(tokens[:8])))


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("chunk", [3, 8])
def test_prefill_equals_appending_chunk_by_chunk(name, chunk):
    """Grouped prefill (entropy and encoder steps ahead, one global step per group of chunks) leaves
    the state and the logits that appending each chunk in turn does, across many groups (max_step 8:
    a group's patches wrap the cross ring) and with decoding after it."""
    model = tiny_model(name)
    tokens = random_tokens(150, seed=5)[0].numpy()
    a, b = new_state(model, max_step=8), new_state(model, max_step=8)
    want = None
    for i in range(0, len(tokens), chunk):
        want = b.run(b.append(tokens[i : i + chunk]))[-1]
    got = a.run(a.prefill(tokens, chunk))
    assert a.calls["global"] < b.calls["global"]  # grouped: fewer global steps
    assert a.calls["entropy"] == b.calls["entropy"] and a.calls["decoder"] == b.calls["decoder"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert (a.n, a.g_len) == (b.n, b.g_len) and np.array_equal(a.closed[: a.n + 1], b.closed[: b.n + 1])
    for t in random_tokens(12, seed=6)[0].tolist():  # decoding on top reads every cache the prefill wrote
        np.testing.assert_allclose(a.run(a.append([t])), b.run(b.append([t])), rtol=0, atol=1e-5)
