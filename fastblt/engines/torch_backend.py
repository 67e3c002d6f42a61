"""The `torch` backend: the reference step functions, eager, no graphs. The source of truth."""

from __future__ import annotations

import copy

import torch

from fastblt.engines.base import Availability, Backend, register, resolve_device
from fastblt.engines.cuda_graphs import GraphCache, capture_step
from fastblt.errors import InputError
from fastblt.export.spec import StepSpec
from fastblt.model import steps
from fastblt.model.blt import BltModel


def _kv(feeds: dict[str, torch.Tensor], prefix: str, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(feeds[f"{prefix}.{i}.k"], feeds[f"{prefix}.{i}.v"]) for i in range(n)]


def _named(prefix: str, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for i, (k, v) in enumerate(kv):
        out[f"{prefix}.{i}.k"], out[f"{prefix}.{i}.v"] = k, v
    return out


def run_named_step(model: BltModel, step: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Call the reference step function `step` with feeds named as in export/spec.py."""
    c = model.config
    n_cross = c.decoder_cross_layers
    if step == "entropy":
        ent, present = steps.entropy_step(
            model.entropy_model, feeds["tokens"], feeds["start"], _kv(feeds, "past", c.entropy.n_layers)
        )
        return {"entropies": ent, **_named("present", present)}
    if step == "encoder":
        h, present = steps.encoder_step(
            model, feeds["tokens"], feeds["hash_ids"], feeds["start"], _kv(feeds, "past", c.encoder.n_layers)
        )
        return {"h": h, **_named("present", present)}
    if step == "global":
        latents, cross, present = steps.global_step(
            model,
            feeds["patch_bytes"],
            feeds["patch_lens"],
            feeds["start"],
            _kv(feeds, "past", c.global_model.n_layers),
        )
        return {"latents": latents, **_named("cross", cross), **_named("present", present)}
    past, cross = _kv(feeds, "past", c.decoder.n_layers), _kv(feeds, "cross", n_cross)
    if step == "decoder":
        logits, present = steps.decoder_step(model, feeds["h"], feeds["read_patch"], feeds["start"], past, cross)
        return {"logits": logits, **_named("present", present)}
    if step == "decoder_block":
        logits = steps.decoder_block_step(model, feeds["block_ids"], feeds["start"], feeds["read_patch"], past, cross)
        return {"logits": logits}
    raise KeyError(step)


class TorchBackend(Backend):
    """Eager PyTorch on `device` (default: where the model's weights are).

    A model on another device is copied there; the caller's model is never moved. On a CUDA
    device, repeated small step calls are captured and replayed as CUDA graphs (cuda_graphs.py);
    `cuda_graphs=False` keeps every call eager.
    """

    name = "torch"

    def __init__(
        self,
        specs: dict[str, StepSpec],
        model: BltModel,
        threads: int | None = None,
        device: str | torch.device | None = None,
        cuda_graphs: bool | None = None,
    ):
        super().__init__(specs)
        here = next(model.parameters()).device
        self.device = here if device is None else resolve_device(device)
        self.model = (model if self.device == here else copy.deepcopy(model).to(self.device)).eval()
        self.threads = threads
        if cuda_graphs and self.device.type != "cuda":
            raise InputError(f"cuda_graphs: the torch backend runs on {self.device}; CUDA graphs need a CUDA device")
        self.graphs = GraphCache() if (cuda_graphs is None and self.device.type == "cuda") or cuda_graphs else None

    def _activate_impl(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)

    def _deactivate_impl(self) -> None:
        if self.graphs is not None:
            self.graphs.clear()

    def _run_step_impl(self, step: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = self.device
        feeds = {k: v if v.device == dev else v.to(dev) for k, v in feeds.items()}
        if self.graphs is not None:
            graph = self.graphs.lookup(step, feeds, lambda f: capture_step(self._eager(step), f, dev))
            if graph is not None:
                return graph(feeds)
        return self._eager(step)(feeds)

    def _eager(self, step: str):
        def run(feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            with torch.inference_mode():
                return run_named_step(self.model, step, feeds)

        return run


def _availability() -> Availability:
    if torch.cuda.is_available():
        gpus = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))
        return Availability("torch", True, f"torch {torch.__version__}: cpu eager; {gpus} with CUDA graphs")
    return Availability("torch", True, f"torch {torch.__version__}: cpu eager (no CUDA device)")


register("torch", TorchBackend, _availability)
