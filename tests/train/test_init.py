"""init.init_weights: fan-in scaled truncated-normal init, residual outputs scaled by depth."""

from __future__ import annotations

import dataclasses
import math

import torch

from fastblt.model.blt import BltModel, EntropyModel
from fastblt.model.config import VOCAB_SIZE
from fastblt.train.init import init_weights
from fastblt.train.loop import default_plan, smoke_plan


def _std(t: torch.Tensor) -> float:
    return float(t.detach().float().std())


def test_every_matrix_gets_its_fan_in_std_and_residual_outputs_are_scaled_by_depth():
    torch.manual_seed(0)
    model = init_weights(BltModel(default_plan(20, 0, 20).model))
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), name  # norm weights
            continue
        want = p.shape[1] ** -0.5  # Linear (out, in): fan_in^-1/2; Embedding (rows, dim): dim^-1/2
        if name.endswith(("wo.weight", "w2.weight")):
            depth = int(name.split("layers.")[1].split(".")[0])
            want /= math.sqrt(2 * (depth + 1))
        # a truncated normal at 3 sigma has std 0.986 sigma
        assert abs(_std(p) / (0.986 * want) - 1) < 0.08, (name, _std(p), want)
        assert float(p.detach().abs().max()) <= 3 * want * 1.0001, name


def test_the_global_transformer_is_not_swamped_by_its_input_at_init():
    """With PyTorch's defaults the patch slots entering the global model are ~4x the size of what its
    layers add (ratio 0.17); the scaled init starts them level (ratio ~0.7)."""
    plan = default_plan(20, 0, 20)
    x = torch.randint(4, 260, (2, 256), generator=torch.Generator().manual_seed(0))
    x[:, 0] = 1
    lengths = torch.tensor([[1] + [5] * 51] * 2)

    def ratio(scaled: bool) -> float:
        torch.manual_seed(0)
        model = BltModel(plan.model)
        if scaled:
            init_weights(model)
        with torch.no_grad():
            h = model.encode(x)
            slots = model.patch_slots(h, lengths)
            added = model.global_latents(h, lengths) - slots
        return float(added.norm() / slots.norm())

    assert ratio(scaled=True) > 0.5 > 0.25 > ratio(scaled=False)


def test_entropy_model_init_and_a_plan_chooses_it():
    from fastblt.train.loop import initialised

    torch.manual_seed(0)
    plan = smoke_plan()
    model = initialised(EntropyModel(plan.baseline, VOCAB_SIZE), dataclasses.replace(plan.base, init="scaled"))
    assert abs(_std(model.tok_embeddings.weight) / (0.986 * plan.baseline.dim**-0.5) - 1) < 0.1
    torch.manual_seed(0)
    default = initialised(EntropyModel(plan.baseline, VOCAB_SIZE), dataclasses.replace(plan.base, init="torch"))
    assert abs(_std(default.tok_embeddings.weight) - 1) < 0.1  # PyTorch's N(0, 1)
