"""Backend wrappers for validation: record what a runtime feeds a backend, or what it returns.

`RecordingBackend` delegates every step to an inner backend and keeps copies of the feeds of
selected calls (real, prompt-derived step inputs for per-graph parity) and/or a compact trace of
every call's outputs (to find the first step where two end-to-end runs part).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fastblt.engines.base import Backend
from fastblt.export.spec import new_positions


def sparse_schedule(i: int) -> bool:
    """Record calls 0-3, then 5, 8, 13, 21, ... (Fibonacci): early steps and a spread of later ones."""
    if i < 4:
        return True
    a, b = 3, 5
    while b < i:
        a, b = b, a + b
    return b == i


@dataclass
class TraceCall:
    """One step call of an end-to-end run: which step, where it wrote, and copies of its outputs."""

    index: int
    step: str
    start: list[int]
    new: int  # S (or Pn for the global step)
    outputs: dict[str, Tensor]


class RecordingBackend(Backend):
    """Wraps `inner`; records feeds of the calls `select(step, i)` picks, and optionally a trace.

    Recorded feeds are cloned (the runtime reuses its cache buffers in place), so record sparsely:
    each copy holds every cache buffer of the step as large as the context then is.
    """

    def __init__(
        self,
        inner: Backend,
        select: Callable[[str, int], bool] | None = None,
        max_per_step: int = 6,
        trace: bool = False,
    ):
        super().__init__(inner.specs)
        self.inner = inner
        self.name, self.device = inner.name, inner.device
        self.select = select
        self.max_per_step = max_per_step
        self.trace_enabled = trace
        self.recorded: list[tuple[str, int, dict[str, Tensor]]] = []  # (step, call index, feeds)
        self.trace: list[TraceCall] = []
        self._seen: dict[str, int] = {}
        self._aliased = {step: {o for o, _ in spec.aliases} for step, spec in inner.specs.items()}
        self._kept: dict[str, int] = {}

    def _activate_impl(self) -> None:
        self.inner.activate()

    def _deactivate_impl(self) -> None:
        self.inner.deactivate()

    def _run_step_impl(self, step: str, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        i = self._seen.get(step, 0)
        self._seen[step] = i + 1
        if self.select is not None and self._kept.get(step, 0) < self.max_per_step and self.select(step, i):
            self._kept[step] = self._kept.get(step, 0) + 1
            self.recorded.append((step, i, host_copies(feeds)))
        out = self.inner.run_step(step, feeds, check=False)
        if self.trace_enabled:  # the step's own outputs: caches it wrote show in later steps' outputs
            new = new_positions(feeds)
            start = [int(s) for s in feeds["start"].reshape(-1).tolist()]
            own = {k: v for k, v in out.items() if k not in self._aliased[step]}
            self.trace.append(TraceCall(len(self.trace), step, start, new, host_copies(own)))
        return out


def host_copies(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copies on the host: backends own their outputs until their next call, the runtime reuses
    its cache buffers in place, and a backend may keep either on a GPU."""
    return {
        k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else torch.as_tensor(v)
        for k, v in tensors.items()
    }
