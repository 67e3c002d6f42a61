"""One graph's weights at a time (how `fastblt export` and benchmarks/export_bench.py export a model
bigger than memory): a graph asks for each parameter by name, and a mapped checkpoint reads and
casts only those."""

from __future__ import annotations

import onnx
import torch

from fastblt.export.exporter import mapped_weights
from fastblt.export.graphs import export_step, model_weights
from fastblt.export.spec import step_specs

from export_helpers import MAX_STEP


def _export(config, spec, weights, path):
    asked: list[str] = []

    def recording(name: str) -> torch.Tensor:
        asked.append(name)
        return weights(name)

    export_step(config, spec, recording, path, "float32", 1 << 40)
    return set(asked)


def test_each_graph_asks_for_its_own_parameters_and_together_for_all(ref_model, tmp_path):
    specs = step_specs(ref_model.config, MAX_STEP)
    used = {
        step: _export(ref_model.config, spec, model_weights(ref_model), tmp_path / f"{step}.onnx")
        for step, spec in specs.items()
    }
    assert all(n.startswith("entropy_model.") for n in used["entropy"])
    assert {"encoder_hash_tok_embedding.0.weight", "local_encoder.tok_embeddings.weight"} <= used["encoder"]
    assert not any(n.startswith("encoder_hash_tok_embedding") for s in ("global", "decoder") for n in used[s])
    assert "local_decoder.diffusion_embeddings.weight" in used["decoder_block"] - used["decoder"]
    assert set().union(*used.values()) == {n for n, _ in ref_model.named_parameters()}


def test_mapped_weights_export_the_same_graphs_as_the_loaded_model(ckpt_dir, ref_model, tmp_path):
    config, weights = mapped_weights(ckpt_dir, torch.float32)
    assert config == ref_model.config
    for step, spec in step_specs(config, MAX_STEP).items():
        export_step(config, spec, weights, tmp_path / f"mapped-{step}.onnx", "float32", 1 << 40)
        export_step(config, spec, model_weights(ref_model), tmp_path / f"loaded-{step}.onnx", "float32", 1 << 40)
        a = onnx.load(str(tmp_path / f"mapped-{step}.onnx"))
        b = onnx.load(str(tmp_path / f"loaded-{step}.onnx"))
        assert a.SerializeToString() == b.SerializeToString(), step
