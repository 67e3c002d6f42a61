"""An Engine: one backend shared by many sequences.

It owns the backend, the locks that serialise its step calls (a backend's output buffers are
shared, so a step call and the copy of its outputs into a sequence's own buffers hold the step's
lock: one lock per step where the backend runs different steps at once, else one for all), and a
small pool of idle SequenceStates so that cache buffers are not reallocated per call. A Generator
runs on one Engine; several Generators (or threads) may share one.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import torch

from fastblt.engines.base import Backend, resolve_device
from fastblt.engines.registry import backend_factory, check_name
from fastblt.errors import InputError
from fastblt.export.cache import ExportNotice
from fastblt.export.spec import max_step, state_dtype, step_specs
from fastblt.model.blt import BltModel
from fastblt.model.config import BltConfig
from fastblt.runtime.artifacts import graph_backend
from fastblt.runtime.prompt_cache import DEFAULT_MB, PromptCache
from fastblt.runtime.state import SequenceState

POOL_SIZE = 4  # idle SequenceStates kept per engine


class Engine:
    """A backend whose step specs are `config`'s, ready to run sequences (see the module docstring).

    Args:
        backend: any Backend (activated here); its specs fix the capacities and dtype and must be
            the step specs of `config` at those capacities.
        config: the checkpoint's config.
        prompt_cache_mb: memory for prompt snapshots (prompt_cache.py; 0: none), shared by every
            sequence on this engine.
    """

    def __init__(self, backend: Backend, config: BltConfig, prompt_cache_mb: float = DEFAULT_MB):
        try:
            steps, dtype = max_step(backend.specs), state_dtype(backend.specs)
        except (KeyError, StopIteration, TypeError, ValueError, AttributeError):
            raise InputError(f"backend {backend.name}: its specs are not fastblt step specs") from None
        want = step_specs(config, steps, dtype)
        if backend.specs != want:
            bad = next((s for s in want if backend.specs.get(s) != want[s]), sorted(set(backend.specs) - set(want)))
            raise InputError(f"backend {backend.name}: step {bad} does not match this checkpoint's config")
        self.backend, self.config = backend.activate(), config
        self.max_step = steps
        one = threading.Lock()
        self.locks = {step: threading.Lock() if backend.concurrent_steps else one for step in backend.specs}
        self._pool: list[SequenceState] = []
        self._pool_lock = threading.Lock()
        self.prompts = PromptCache(prompt_cache_mb)

    @property
    def device(self) -> torch.device:
        """Where the backend computes and the sequences' caches live."""
        return self.backend.device

    def acquire(self) -> SequenceState:
        """An empty sequence (from the pool when one is idle); give it back with `release`."""
        with self._pool_lock:
            state = self._pool.pop() if self._pool else None
        if state is None:
            state = SequenceState(self.backend, self.config, locks=self.locks)
        state.reset()
        state.reset_counters()
        return state

    def release(self, state: SequenceState) -> None:
        """Back to the pool, its growing caches shrunk: an idle sequence holds no long context."""
        state.reset()
        with self._pool_lock:
            if len(self._pool) < POOL_SIZE:
                self._pool.append(state)

    def close(self) -> None:
        """Release the backend's sessions and buffers once no step call runs (each step's lock is
        taken first); a later call loads them again."""
        with contextlib.ExitStack() as held:
            for lock in {id(lock): lock for lock in self.locks.values()}.values():
                held.enter_context(lock)
            self.backend.deactivate()


def open_engine(
    model: BltModel,
    backend: str,
    checkpoint_path: Path | None = None,
    artifacts: str | Path | None = None,
    threads: int | None = None,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    cuda_graphs: bool | None = None,
    on_export: ExportNotice | None = None,
    prompt_cache_mb: float = DEFAULT_MB,
) -> Engine:
    """An Engine for `model` on the backend named `backend` (see Generator for the arguments)."""
    check_name(backend)
    if cuda_graphs is not None and backend != "torch":
        raise InputError(f"cuda_graphs: a torch backend option; backend {backend!r} has its own execution")
    if device is not None and backend == "ort" and resolve_device(device).type != "cpu":
        raise InputError(
            f"device {device!r}: the ort backend computes where its execution providers run; "
            "choose backend 'torch' or 'trt' to pick a GPU"
        )
    if backend == "torch":
        if artifacts is not None:
            raise InputError("artifacts: the torch backend runs the checkpoint itself; pass artifacts only for ort/trt")
        factory = backend_factory(backend)
        specs = step_specs(model.config)
        torch_backend = factory(specs, model, threads=threads, device=device, cuda_graphs=cuda_graphs)
        return Engine(torch_backend, model.config, prompt_cache_mb)
    extra = {"device": device} if backend == "trt" and device is not None else {}
    graphs = graph_backend(model, checkpoint_path, backend, artifacts, threads, cache_dir, extra, on_export)
    return Engine(graphs, model.config, prompt_cache_mb)
