"""The backends by name: what exists, whether it can run here, and how to make one.

The one list of backend names (`BACKENDS`). Each backend's module is imported only when that
backend is asked about, so `torch` alone never imports onnxruntime or tensorrt.
"""

from __future__ import annotations

from collections.abc import Callable

from fastblt.engines.base import Availability, Backend
from fastblt.errors import BackendUnavailable, InputError

BACKENDS = ("ort", "torch", "trt")  # the first is the runtime's default


def _torch() -> tuple[Callable[..., Backend], Callable[[], Availability]]:
    from fastblt.engines import torch_backend

    return torch_backend.TorchBackend, torch_backend.availability


def _ort() -> tuple[Callable[..., Backend], Callable[[], Availability]]:
    from fastblt.engines import ort_backend

    return ort_backend.OrtBackend, ort_backend.availability


def _trt() -> tuple[Callable[..., Backend], Callable[[], Availability]]:
    from fastblt.engines.trt import backend, build

    return backend.TrtBackend, build.trt_availability


_LOADERS: dict[str, Callable[[], tuple[Callable[..., Backend], Callable[[], Availability]]]] = {
    "ort": _ort,
    "torch": _torch,
    "trt": _trt,
}


def check_name(name: str) -> str:
    """`name` if it is a backend fastblt knows; InputError listing the known ones otherwise."""
    if name not in BACKENDS:
        raise InputError(f"backend {name!r}: unknown; choose one of {', '.join(BACKENDS)}")
    return name


def available() -> dict[str, Availability]:
    """Every known backend and whether it can run here (with the reason when not)."""
    return {name: _LOADERS[name]()[1]() for name in BACKENDS}


def backend_factory(name: str) -> Callable[..., Backend]:
    """The class of backend `name`; InputError if unknown, BackendUnavailable (with why) if it cannot run here."""
    factory, availability = _LOADERS[check_name(name)]()
    status = availability()
    if not status.available:
        raise BackendUnavailable(f"backend {name}: unavailable here: {status.reason}")
    return factory
