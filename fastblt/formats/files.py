"""Directories written whole or not at all.

Checkpoints and exports are written into a temporary directory next to their destination, then
renamed into place, so a failure or Ctrl-C leaves nothing half-written and never loses what was
there before.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


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
    shutil.rmtree(old, ignore_errors=True)
