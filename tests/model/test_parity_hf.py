"""Our reference model vs transformers' BltForCausalLM (use_cache=False) on the same weights."""

from __future__ import annotations

import pytest
import torch

from fastblt.formats.keymap import config_to_hf, to_hf_state_dict

from tiny import TINY_CONFIGS, make_model, random_tokens

transformers = pytest.importorskip("transformers")


def hf_twin(model):
    hf = transformers.BltForCausalLM(transformers.BltConfig(**config_to_hf(model.config))).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.config), strict=False)
    assert not missing
    assert unexpected in ([], ["model.local_decoder.diffusion_embeddings.weight"])
    hf.config.patching_threshold = model.config.patching.threshold
    return hf


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request):
    model = make_model(request.param, blt_d=False)
    return model, hf_twin(model)


def test_explicit_multibyte_patches(pair):
    model, hf = pair
    tokens = random_tokens(40, batch=2, seed=3)
    lengths = torch.tensor([[1, 3, 2, 4, 10, 20], [1, 1, 1, 7, 20, 10]])
    with torch.no_grad():
        ours, theirs = model(tokens, lengths), hf(tokens, patch_lengths=lengths, use_cache=False).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_entropy_patcher_patches(pair):
    model, hf = pair
    tokens = random_tokens(48, batch=1, seed=4)
    with torch.no_grad():
        lengths = model.patch(tokens)
        ours, theirs = model(tokens), hf(tokens, use_cache=False).logits
    assert lengths.shape[1] > 4 and int(lengths.max()) > 1, "the patcher should make patches of several lengths"
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_longer_than_the_512_window():
    model = make_model("hf-test-sizes", blt_d=False)
    hf = hf_twin(model)
    tokens = random_tokens(600, seed=5)
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens, use_cache=False).logits
    assert (ours[:, 512:] - theirs[:, 512:]).abs().max().item() <= 1e-4
    # the window matters: without it the late positions change
    assert model.config.encoder.window == 512


def greedy_recompute(model, tokens, n):
    for _ in range(n):
        with torch.no_grad():
            nxt = model(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens


def test_greedy_continuation_identical(pair):
    model, hf = pair
    if model.config.patching.max_patch_length is not None:
        # transformers drops a trailing 0-length patch after max_patch_length splitting, so the
        # last byte reads a stale latent whenever it closes its patch; see the next test.
        model = make_model("small-window", blt_d=False, max_patch_length=None)
        hf = hf_twin(model)
    prompt = random_tokens(12, seed=6)
    ours = greedy_recompute(model, prompt, 24)
    with torch.no_grad():
        theirs = hf.generate(
            prompt, max_new_tokens=24, do_sample=False, use_cache=False, eos_token_id=None, pad_token_id=0
        )
    assert ours.tolist() == theirs.tolist()


def test_trailing_boundary_follows_meta_with_max_patch_length():
    """With max_patch_length, a byte that closes its patch makes the next byte's patch: Meta's
    include_next_token rule. transformers' own patcher loses that boundary (it drops the 0-length
    trailing patch when splitting), so we compare against it given our patch lengths."""
    model = make_model("small-window", blt_d=False)
    hf = hf_twin(model)
    prompt = random_tokens(12, seed=6)
    tokens = greedy_recompute(model, prompt, 8)
    found = 0
    for n in range(12, tokens.shape[1] + 1):
        t = tokens[:, :n]
        with torch.no_grad():
            lengths = model.patch(t)
            ours = model(t)
            theirs = hf(t, patch_lengths=lengths, use_cache=False).logits
        assert (ours - theirs).abs().max().item() <= 1e-4
        found += int(lengths[0, -1] == 0)
    assert found > 0, "the walk should meet a byte that closes its patch"
