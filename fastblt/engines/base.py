"""One small backend interface for the five step graphs.

A backend runs a named step on named torch tensors (the names and shapes of export/spec.py).
Public methods check the lifecycle and the feeds, then delegate to `_impl` methods. Backends are
context managers and are looked up by name: `torch` (reference), `ort`, `trt`.

Buffer ownership: feeds are the caller's. A cache output aliased to its input (export/spec.py
`StepSpec.aliases`) is that input, written in place; other outputs belong to the backend and are
valid until the next `run_step` call of that step. Call counts and times are the caller's to keep
(runtime/state.py counts per sequence).

Devices: a backend computes on `backend.device`. Feeds already there are used in place; outputs
are returned there (CPU backends: the host). Callers keep long-lived buffers (the caches) on
`backend.device` so that a step moves only its new entries, never a whole cache.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from fastblt.errors import DeviceUnavailable, InputError
from fastblt.export.spec import TORCH_DTYPES, StepSpec


@dataclass(frozen=True)
class Availability:
    name: str
    available: bool
    reason: str  # why not (or a short description when available)


_LIFECYCLE = threading.RLock()  # activation is rare: one lock for every backend


class Backend(ABC):
    """Runs step graphs. Subclasses implement `_activate_impl`, `_run_step_impl`, `_deactivate_impl`."""

    name: str = "?"
    device: torch.device = torch.device("cpu")
    # whether two different steps may run at once from two threads (each has its own buffers)
    concurrent_steps: bool = False
    # the most rows (sequences) one call may carry, once active; None: no bound of the backend's own
    max_rows: int | None = None

    def __init__(self, specs: dict[str, StepSpec]):
        self.specs = specs
        self.active = False

    # lifecycle --------------------------------------------------------------------------
    def activate(self) -> Backend:
        with _LIFECYCLE:  # a step call of another thread activates lazily at the same moment
            if not self.active:
                self._activate_impl()
                self.active = True
        return self

    def deactivate(self) -> None:
        with _LIFECYCLE:
            if self.active:
                self._deactivate_impl()
                self.active = False

    def __enter__(self) -> Backend:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # the one hot-path call ----------------------------------------------------------------
    def run_step(self, step: str, feeds: dict[str, torch.Tensor], check: bool = True) -> dict[str, torch.Tensor]:
        """Run one step graph. feeds: every input of the step's spec, by name.

        Returns the outputs by name (owned by the backend; valid until the next call of `step`).
        `check=False` skips the name/dtype/rank checks (the runtime's hot loop builds feeds itself).
        """
        if not self.active:
            self.activate()
        if step not in self.specs:
            raise InputError(f"step {step!r}: not in this model's graphs {sorted(self.specs)}")
        if check:
            check_feeds(self.specs[step], feeds)
        return self._run_step_impl(step, feeds)

    @abstractmethod
    def _activate_impl(self) -> None: ...

    @abstractmethod
    def _run_step_impl(self, step: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def _deactivate_impl(self) -> None:
        return None


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device that exists here ("cuda" becomes "cuda:0"); InputError names it otherwise
    (DeviceUnavailable where it is a real device this machine lacks)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device {device!r}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device {device!r}: CUDA is not available here (torch {torch.__version__})")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise InputError(f"device {device!r}: fastblt runs on cpu or cuda")
    return dev


def check_feeds(spec: StepSpec, feeds: dict[str, torch.Tensor]) -> None:
    """Names, dtypes and static dims of feeds against the spec; messages name the tensor."""
    missing = [t.name for t in spec.inputs if t.name not in feeds]
    if missing:
        raise InputError(f"step {spec.name}: missing input(s) {missing}")
    extra = sorted(set(feeds) - {t.name for t in spec.inputs})
    if extra:
        raise InputError(f"step {spec.name}: unexpected input(s) {extra}")
    for t in spec.inputs:
        x = feeds[t.name]
        if x.dtype != TORCH_DTYPES[t.dtype]:
            raise InputError(f"step {spec.name} | input {t.name}: dtype {x.dtype}, expected {t.dtype}")
        if x.dim() != len(t.shape):
            raise InputError(f"step {spec.name} | input {t.name}: shape {tuple(x.shape)}, expected {t.shape}")
        for got, want in zip(x.shape, t.shape, strict=True):
            if isinstance(want, int) and got != want:
                raise InputError(f"step {spec.name} | input {t.name}: shape {tuple(x.shape)}, expected {t.shape}")
