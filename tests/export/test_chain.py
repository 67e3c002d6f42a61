"""The runtime's own cache handling over onnxruntime: SequenceState on the ort backend must give
the logits of the full PyTorch forward (the model's own patching), within 1e-4, with its rings
written in place by the graphs and wrapping around."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from fastblt.engines.ort_backend import OrtBackend
from fastblt.export.spec import step_specs
from fastblt.runtime.state import SequenceState

from export_helpers import MAX_STEP
from tiny import random_tokens


@pytest.fixture(scope="module")
def backend(fp32_export, ref_model):
    b = OrtBackend(step_specs(ref_model.config, MAX_STEP), fp32_export, threads=1)
    yield b
    b.deactivate()


def _full(model, tokens):
    with torch.no_grad():
        return model(tokens)[0]


def test_prefill_then_50_decode_steps(backend, ref_model):
    tokens = random_tokens(80, seed=3)
    full = _full(ref_model, tokens)
    lengths = ref_model.patch(tokens)[0]
    assert len(set(lengths[1:-1].tolist())) >= 3, f"patches should vary in length, got {lengths.tolist()}"
    state = SequenceState(backend, ref_model.config)
    t = tokens[0].numpy()
    outs = [torch.from_numpy(state.run(state.append(t[:30])))]
    for i in range(30, 80):
        outs.append(torch.from_numpy(state.run(state.append(t[i : i + 1]))))
    err = float((torch.cat(outs) - full).abs().max())
    assert err <= 1e-4, f"max abs diff {err:.3g} over 30 prefill + 50 decode positions"
    assert state.calls["decoder"] == 52 and state.calls["global"] >= 1  # 30 = 16 + 14, then 50 single bytes
    assert state.n > state.rows.rings["decoder"][0][0].shape[2]  # the rings wrapped


def test_chunks_and_rollback(backend, ref_model):
    """Multi-byte appends, a rollback into the middle of a chunk, then overwriting the stale slots."""
    tokens = random_tokens(70, seed=5)
    full = _full(ref_model, tokens)
    state = SequenceState(backend, ref_model.config)
    t = tokens[0].numpy()
    outs = [
        torch.from_numpy(state.run(state.append(t[:7]))),
        torch.from_numpy(state.run(state.append(t[7:8]))),
        torch.from_numpy(state.run(state.append(t[8:20]))),
    ]
    state.run(state.append(t[20:27]))  # speculative work, then rolled back to 15
    state.rollback(15)
    outs = [torch.cat(outs)[:15]]
    for i in range(15, 70, 4):
        outs.append(torch.from_numpy(state.run(state.append(t[i : i + 4]))))
    err = float((torch.cat(outs) - full).abs().max())
    assert err <= 1e-4, f"max abs diff {err:.3g}"


def test_every_byte_a_patch_with_full_steps_and_rollback(backend, ref_model):
    """Every byte closes a patch (threshold below any entropy), so a max_step call writes max_step
    patches into the decoder's cross ring in one global step; rolled back into the middle of that
    step and continued, the logits must still be the full forward's. The ring is max_step + 2
    patches (the exported contract TensorRT profiles and the runtime's buffers are sized from)."""
    cfg = ref_model.config
    model = copy.deepcopy(ref_model)
    model.config = dataclasses.replace(cfg, patching=dataclasses.replace(cfg.patching, threshold=-1.0))
    tokens = random_tokens(60, seed=7)
    full = _full(model, tokens)
    assert set(model.patch(tokens)[0][:60].tolist()) == {1}
    decoder = backend.specs["decoder"]
    assert decoder.input("cross.0.k").shape[2] == MAX_STEP + 2
    state = SequenceState(backend, model.config)
    assert state.rows.cross[0][0].shape[2] == MAX_STEP + 2
    t = tokens[0].numpy()
    outs = [torch.from_numpy(state.run(state.append(t[:3])))]
    outs.append(torch.from_numpy(state.run(state.append(t[3 : 3 + MAX_STEP]))))
    assert state.g_len == state.n == 3 + MAX_STEP  # one patch per byte
    state.rollback(9)
    outs = [torch.cat(outs)[:9]]
    for i in range(9, 60, MAX_STEP):
        outs.append(torch.from_numpy(state.run(state.append(t[i : i + MAX_STEP]))))
    err = float((torch.cat(outs) - full).abs().max())
    assert err <= 1e-4, f"max abs diff {err:.3g}"
