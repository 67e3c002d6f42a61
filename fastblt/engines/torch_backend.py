"""The `torch` backend: the reference step functions, eager, no graphs. The source of truth."""

from __future__ import annotations

import copy

import torch

from fastblt.engines.base import Availability, Backend, resolve_device
from fastblt.engines.cuda_graphs import GraphCache, capture_step
from fastblt.errors import InputError
from fastblt.export.reference import run_named_step
from fastblt.export.spec import StepSpec
from fastblt.model.blt import BltModel


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


def availability() -> Availability:
    if torch.cuda.is_available():
        gpus = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))
        return Availability("torch", True, f"torch {torch.__version__}: cpu eager; {gpus} with CUDA graphs")
    return Availability("torch", True, f"torch {torch.__version__}: cpu eager (no CUDA device)")
