"""Incremental steps with ring and linear caches == the full forward, for any chunking and rollback."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastblt.engines.torch_backend import TorchBackend
from fastblt.export.spec import PAST_BUCKET, cross_slots, past_slots, step_specs
from fastblt.model import steps
from fastblt.model.patching import decoder_patch_ids, patch_ids_from_lengths
from fastblt.runtime.state import SequenceState

from tiny import TINY_CONFIGS, make_model, random_tokens

N = 56
MODELS = {name: make_model(name) for name in TINY_CONFIGS}
MODELS["deep-local+decoder-input-norm"] = make_model("deep-local", decoder_input_norm=True)  # fastblt's own
TOKENS = random_tokens(N, seed=11)
with torch.no_grad():
    FULL = {name: m(TOKENS)[0] for name, m in MODELS.items()}


def new_state(model, max_step=16):
    return SequenceState(TorchBackend(step_specs(model.config, max_step), model), model.config)


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(sorted(MODELS)),
    chunks=st.lists(st.integers(1, 9), min_size=1, max_size=12),
    rollbacks=st.lists(st.tuples(st.integers(0, N), st.integers(1, 8)), max_size=3),
)
def test_chunked_prefill_decode_and_rollback_match_full_forward(name, chunks, rollbacks):
    """Prefill in random chunks, then single bytes; in between, append garbage and roll it back."""
    model, tokens = MODELS[name], TOKENS[0].numpy()
    state = new_state(model)
    logits = torch.zeros(N, 260)
    todo = list(rollbacks)
    n = 0
    for size in chunks + [1] * N:
        if n >= N:
            break
        size = min(size, N - n)
        logits[n : n + size] = torch.from_numpy(state.run(state.append(tokens[n : n + size])))
        n += size
        if todo and todo[0][0] <= n:
            _, junk = todo.pop(0)
            if junk > 0:
                state.run(state.append((tokens[:junk] * 7 + 3) % 256 + 4))  # wrong bytes, then undo them
                state.rollback(n)
    assert (logits - FULL[name]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", sorted(MODELS))
def test_rollback_restores_patch_state(name):
    model, tokens = MODELS[name], TOKENS[0].numpy()
    state = new_state(model, max_step=32)
    state.run(state.append(tokens[:30]))
    snapshot = (state.n, state.g_len, state.open_patch_start())
    state.run(state.append(tokens[30:50]))
    assert state.g_len > snapshot[1]
    state.rollback(30)
    assert (state.n, state.g_len, state.open_patch_start()) == snapshot


@pytest.mark.parametrize("norm", [False, True])
def test_decoder_input_norm_makes_the_decoder_blind_to_the_scale_of_its_input(norm):
    """With decoder_input_norm the encoder states' scale cannot drown the latent the cross-attention
    adds: scaling them by 10 changes nothing. Without it (the released models) it does."""
    model = make_model("deep-local", decoder_input_norm=norm)
    tokens = random_tokens(40, seed=3)
    with torch.no_grad():
        lengths = model.patch(tokens)
        h = model.encode(tokens)
        latents = model.global_latents(h, lengths)
        dpid = decoder_patch_ids(lengths, 40)
        change = (model.decode(10 * h, latents, dpid) - model.decode(h, latents, dpid)).abs().max().item()
    assert (change <= 1e-4) if norm else (change > 1e-2), change


def empty_cache(cfg, slots: int) -> list:
    """Zeroed (keys, values) per layer, (1, heads, slots, head_dim)."""
    shape = (1, cfg.n_heads, slots, cfg.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.n_layers)]


def cross_ring(model, latents, max_step: int) -> list:
    """The decoder's cross ring (1, 1, C, k*d) holding every patch of `latents` (P <= C)."""
    C = cross_slots(max_step)
    ring = []
    for k, v in model.decoder_cross_kv(latents):  # (1, P, k, d)
        rk, rv = torch.zeros(1, 1, C, k.shape[2] * k.shape[3]), torch.zeros(1, 1, C, v.shape[2] * v.shape[3])
        rk[0, 0, : k.shape[1]], rv[0, 0, : v.shape[1]] = k[0].flatten(-2), v[0].flatten(-2)
        ring.append((rk, rv))
    return ring


def test_block_step_equals_training_layout():
    """The diffusion head at inference (cache + block step) computes exactly the training layout."""
    model = make_model("small-window")
    tokens = random_tokens(40, seed=2)
    lengths = torch.tensor([[1, 3, 2, 5, 4, 6, 3, 2, 4, 6, 4]])
    B = model.config.blt_d.block_size
    starts = (torch.cumsum(lengths, -1) - lengths)[:, 1:8]
    read = patch_ids_from_lengths(lengths, 40).gather(1, starts) - 1
    ids = torch.randint(4, 262, (1, starts.shape[1], B), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = model.encode(tokens)
        latents = model.global_latents(h, lengths)
        dpid = decoder_patch_ids(lengths, 40)
        clean, blocks = model.decode_with_blocks(h, latents, dpid, ids, starts, read)
        # the clean rows of the N + M*Bk layout vs a pass over the N rows alone: the same math over
        # other matrix shapes, so BLAS may sum in another order (up to ~4e-7 with AVX2 kernels, 0
        # with AVX-512); a block leaking into a clean row moves its logits by far more than 1e-5
        assert (clean - model.decode(h, latents, dpid)).abs().max().item() <= 1e-5
        cross = cross_ring(model, latents, max_step=64)
        for m in range(starts.shape[1]):
            s = int(starts[0, m])
            cache = empty_cache(model.config.decoder, steps.ring_slots(model.config.decoder.window, 64))
            steps.decoder_step(model, h[:, :s], dpid[:, :s], torch.tensor([0]), cache, cross)
            got = steps.decoder_block_step(model, ids[:, m], torch.tensor([s]), read[:, m], cache, cross)
            assert (got - blocks[0, m]).abs().max().item() <= 1e-5


def test_blocks_never_see_clean_bytes_at_or_after_their_start():
    """No label leak: changing clean bytes at or after a block's start leaves the block's logits."""
    model = make_model("hf-test-sizes")
    tokens = random_tokens(40, seed=2)
    lengths = torch.tensor([[1, 3, 2, 5, 4, 6, 3, 2, 4, 6, 4]])
    s = 15
    starts, read = torch.tensor([[s]]), torch.tensor([[3]])  # patch 4 starts at 15; patch 3 ends at 14
    ids = torch.full((1, 1, 4), model.config.blt_d.mask_id)
    outs = []
    for variant in (tokens, torch.cat([tokens[:, :s], (tokens[:, s:] * 3) % 250 + 4], dim=1)):
        with torch.no_grad():
            h = model.encode(variant)
            latents = model.global_latents(h, lengths)
            outs.append(model.decode_with_blocks(h, latents, decoder_patch_ids(lengths, 40), ids, starts, read)[1])
    assert (outs[0] - outs[1]).abs().max().item() == 0.0


LONG = 1500
LONG_TOKENS = random_tokens(LONG, seed=5)
with torch.no_grad():
    LONG_FULL = MODELS["small-window"](LONG_TOKENS)[0]


@settings(max_examples=6, deadline=None)
@given(
    chunks=st.lists(st.integers(1, 12), min_size=1, max_size=40),
    junk=st.lists(st.integers(0, 11), min_size=1, max_size=40),
)
def test_rings_wrap_many_times_and_roll_back_across_the_wrap(chunks, junk):
    """1,500 positions through rings of window 8 + max_step 12 = 20 slots (75 laps), in random
    chunks, each followed by up to 11 wrong positions rolled back (max_step - 1: the most a decoding
    loop leaves behind), many of them across a ring's wrap: every logit equals the full forward."""
    model = MODELS["small-window"]
    state = new_state(model, max_step=12)
    tokens = LONG_TOKENS[0].numpy()
    logits = torch.zeros(LONG, 260)
    n, i = 0, 0
    while n < LONG:
        size = min(chunks[i % len(chunks)], LONG - n)
        logits[n : n + size] = torch.from_numpy(state.run(state.append(tokens[n : n + size])))
        n += size
        wrong = junk[i % len(junk)]
        if wrong and n < LONG:
            state.run(state.append((tokens[n : n + wrong] * 5 + 1) % 256 + 4))
            state.rollback(n)
        i += 1
    assert state.rows.rings["decoder"][0][0].shape[2] == 20
    assert (logits - LONG_FULL).abs().max().item() <= 1e-5


def test_the_global_cache_grows_with_the_context_and_shrinks_for_a_new_sequence():
    model = MODELS["small-window"]
    state = new_state(model, max_step=12)
    global_cache = state.linear["global"]
    assert global_cache.slots == PAST_BUCKET
    tokens = LONG_TOKENS[0].numpy()
    for n in range(0, 600, 12):
        state.run(state.append(tokens[n : n + 12]))
    assert global_cache.slots >= state.g_len > PAST_BUCKET and global_cache.slots % PAST_BUCKET == 0
    assert global_cache.slots == past_slots(state.g_len)  # the live prefix, rounded up by the runtime's rule
    state.reset()
    assert global_cache.slots == PAST_BUCKET and state.n == 0


def test_a_linear_cache_grows_by_a_bucket_or_an_eighth():
    """past_slots: the live prefix rounded up to PAST_BUCKET slots, or to an eighth of its power of
    two once that is more; never fewer than n, never more than an eighth (or a bucket) beyond it,
    and growing with n; a cache of 10,000 positions grows in far fewer copies than bucket by bucket."""
    sizes = [past_slots(n) for n in range(1, 10_001)]
    for n, slots in enumerate(sizes, start=1):
        assert n <= slots <= n + max(PAST_BUCKET - 1, n // 8) and slots % PAST_BUCKET == 0
    assert sizes == sorted(sizes)
    assert past_slots(100) == 128 and past_slots(1024) == 1024 and past_slots(2600) == 2816
    growths = len(set(sizes))
    assert growths < 10_000 // PAST_BUCKET // 3  # 42 sizes, where buckets alone would be 157
