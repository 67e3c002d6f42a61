"""One graph's weights at a time (how benchmarks/export_bench.py exports a BLT-1B-shaped model):
a meta-device model, the step's parameters found without compute, materialized for its export."""

from __future__ import annotations

import torch
from parity_helpers import max_abs, random_feeds

from fastblt.export.graphs import StepModule, materialized, step_parameter_names
from fastblt.export.reference import run_named_step
from fastblt.export.spec import step_specs
from fastblt.model.blt import BltModel

from export_helpers import CAPACITY, PATCH_CAPACITY


def test_step_parameters_partition_the_model(ref_model):
    with torch.device("meta"):
        meta = BltModel(ref_model.config)
    specs = step_specs(ref_model.config, CAPACITY, PATCH_CAPACITY)
    used = {step: set(step_parameter_names(meta, spec)) for step, spec in specs.items()}
    assert all(n.startswith("entropy_model.") for n in used["entropy"])
    assert {"encoder_hash_tok_embedding.0.weight", "local_encoder.tok_embeddings.weight"} <= used["encoder"]
    assert not any(n.startswith("encoder_hash_tok_embedding") for s in ("global", "decoder") for n in used[s])
    assert "local_decoder.diffusion_embeddings.weight" in used["decoder_block"] - used["decoder"]
    assert set().union(*used.values()) == {n for n, _ in meta.named_parameters()}


def test_materialized_step_computes_the_reference(ref_model):
    """With only its own parameters materialized, a meta model runs the step exactly (the ONNX
    export of such a model is what benchmarks/export_bench.py measures on BLT-1B shapes)."""
    with torch.device("meta"):
        meta = BltModel(ref_model.config)
    state = ref_model.state_dict()
    specs = step_specs(ref_model.config, CAPACITY, PATCH_CAPACITY)
    for step, spec in specs.items():
        feeds = random_feeds(spec, ref_model.config, 3, [2, 30], PATCH_CAPACITY, seed=4)
        with torch.no_grad():
            ref = run_named_step(ref_model, step, feeds)
            with materialized(meta, step_parameter_names(meta, spec), lambda name, p: state[name].clone()):
                got = StepModule(meta, spec)(*(feeds[t.name] for t in spec.inputs))
        assert all(p.device.type == "meta" for p in meta.parameters())  # released again
        for t, y in zip(spec.outputs, got, strict=True):
            assert max_abs(y, ref[t.name]) == 0.0, (step, t.name)
