"""Directories one server process holds: the kept responses' (kept.py) and the Batch API's
(batches.py). A second server on the same directory is refused at start, naming the first: each
keeps its own account of what the directory holds (a store's budget; the batches it runs, which a
second would run again), and what one finds running there and does not run, it takes for work a
server left unfinished when it was killed.

The hold is an flock on a file in the directory, released by the kernel when the process ends,
however it ends, so the next server after a crash starts without help.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from fastblt.errors import InputError

_HELD: dict[Path, IO[str]] = {}  # the lock files this process holds, by resolved path


def check_free(directory: Path, lock: str, what: str) -> None:
    """InputError as `hold` raises it if another process holds `directory`; nothing is taken (a
    command that leaves the holding to another process: Ray's actors)."""
    path = directory.resolve() / lock
    if not path.exists() or path in _HELD:
        return
    with open(path) as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(directory, probe, what) from None


def hold(directory: Path, lock: str, what: str) -> None:
    """Take `directory` (made if missing) for this process until it exits, through its file
    `lock` (taken already: nothing to do), or raise InputError naming the process that has it
    and `what` it keeps there."""
    path = directory.resolve() / lock
    if path in _HELD:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    held = open(path, "a+")  # noqa: SIM115 (open while the process runs: the hold)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held.seek(0)
        error = _in_use(directory, held, what)
        held.close()
        raise error from None
    held.seek(0)
    held.truncate()
    held.write(str(os.getpid()))
    held.flush()
    _HELD[path] = held


def _in_use(directory: Path, lock: IO[str], what: str) -> InputError:
    """The error naming the process whose pid the held `lock` file holds."""
    pid = lock.read().strip()[:20]
    return InputError(f"{directory}: in use by another server{f' (pid {pid})' if pid else ''}; one server keeps "
                      f"its {what} in a directory at a time")  # fmt: skip
