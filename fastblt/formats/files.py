"""Directories and files written whole or not at all.

Checkpoints and exports are written into a temporary directory next to their destination, then
renamed into place (single files likewise: `write_atomic`), so a failure or Ctrl-C leaves nothing
half-written and never loses what was there before.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fastblt.errors import FastBltError, InputError


def staging_dir(out: Path, purpose: str) -> Path:
    """A fresh, world-readable temporary directory next to `out` (same filesystem: renames are atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{purpose}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; what lands here is an ordinary directory
    return tmp


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`. An existing `out` is renamed aside first and removed only
    once `tmp` is in place; if anything fails (or is interrupted) in between, it is put back."""
    if not out.exists():
        tmp.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:  # `out` was a file (replaced only when the caller was told to)
        old.unlink(missing_ok=True)


def check_apart(out: Path, source: Path, what: str) -> None:
    """FastBltError unless `out` can be replaced without touching `source`: not the same
    directory, not one that holds it, not one inside it (replacing `out` deletes what it holds)."""
    o, s = Path(out).expanduser().resolve(), Path(source).expanduser().resolve()
    if o == s or o in s.parents or s in o.parents:
        how = "is" if o == s else "holds" if o in s.parents else "is inside"
        raise FastBltError(f"{out}: {how} the {what} {source}; write into another directory")


def utf8_path(path: str | Path, what: str) -> Path:
    """`path`, refused unless its bytes are UTF-8: onnx, onnxruntime and TensorRT's parser take file
    names as UTF-8 strings and fail deep inside on others (Python holds them with lone surrogates)."""
    path = Path(path)
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise InputError(f"{what} {shown}: not UTF-8; ONNX graphs are read and written only by UTF-8 paths") from None
    return path


def read_text(path: Path, label: str, expected: str = "a text file") -> str:
    """A UTF-8 file's text; InputError (one line, starting with `label`) when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{label}: is a directory, expected {expected}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{label}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise InputError(f"{label}: cannot read it ({e.strerror or e})") from None


def write_atomic(path: Path, data: bytes) -> None:
    """Readers, and an interrupted run, see the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mode_for(path: Path) -> int:
    """The replaced file's permissions, or a new file's (mkstemp's are owner-only)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
