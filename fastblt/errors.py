"""fastblt's exceptions: one base for everything a user can cause, and one for our own bugs.

Messages name the thing that is wrong (file, tensor, field, shape), then what was expected and
what was received, on one line. The CLI prints them as ``error: <message>`` and exits 2.
"""

from __future__ import annotations


class FastBltError(Exception):
    """Something the user gave us (a file, a config, an input) is wrong."""


class ConfigError(FastBltError):
    """A config field is missing, of the wrong type, or out of range."""


class CheckpointError(FastBltError):
    """A checkpoint is missing, unreadable, of an unknown format, or does not match its config."""


class InputError(FastBltError):
    """Bad call arguments: token ids, prompts, shapes, sampling values."""


class PositionLimit(InputError):
    """A sequence reached the global model's position limit (in patches) after `bytes_read` ids."""

    def __init__(self, message: str, limit: int = 0, bytes_read: int = 0):
        super().__init__(message, limit, bytes_read)  # all of them: it crosses a lane's pipe pickled
        self.limit, self.bytes_read = limit, bytes_read

    def __str__(self) -> str:
        return self.args[0]


class CapabilityError(FastBltError):
    """The checkpoint cannot do what was asked (for example BLT-D on a plain BLT checkpoint)."""


class ManifestMismatch(FastBltError):
    """Artifacts (ONNX files, engines) do not match the checkpoint, the manifest or this machine."""


class BackendUnavailable(FastBltError):
    """A backend cannot run here; the message says why."""


class InternalError(Exception):
    """An invariant of fastblt itself broke: a bug, not a user error."""


class DeviceUnavailable(BackendUnavailable, InputError):
    """The device asked for is not on this machine (no CUDA, or fewer GPUs): the CLI's exit 3, as
    for a backend that cannot run here; still an InputError for callers that catch those."""


class EngineBusy(FastBltError):
    """A batch engine's queue is full: nothing is wrong with the request; retry later."""


class EngineClosed(FastBltError):
    """A batch engine is shutting down and takes no new requests."""


class LaneLost(EngineClosed):
    """A batch lane's worker process died: the requests it held failed, and it takes new ones once
    its next process is up. Nothing is wrong with the request: send it again."""


class Cancelled(FastBltError):
    """A request was cancelled before it finished."""
