"""Prompt snapshots shared by an AsyncEngine's worker lanes, as files in shared memory.

Each lane keeps its own snapshots within its own budget (prompt_cache.py), but writes each one
into a file of a directory in /dev/shm that every lane of the engine reads, and keeps it there as a
mapping of that file (one copy in memory, not two). A request whose prompt's snapshot another lane
took loads it from that file instead of committing the prompt again: without this, with L lanes
busy a prompt sent again finds its snapshot about 1 / L of the time. Loading another lane's
snapshot is as exact as loading one's own: the lanes run the same graphs on the same settings.

A file is written whole under a temporary name, then linked into place under its key, so a reader
sees a file whole or not at all, and one removed while a reader maps it stays readable to it. The
first lane to publish a key owns its file (a lane replaces only its own, with one serving more
scoring requests) and removes it when its cache lets the snapshot go; a lane that finds a snapshot
in another's file touches the file, and its owner keeps a touched file a while longer. The engine
removes the directory when it closes; one left by an engine that was killed is removed by the next
engine started on the machine. A file that cannot be written (the filesystem is full: Docker gives
/dev/shm 64 MB unless told otherwise) leaves the snapshot in the lane's own memory, as without
sharing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastblt.export.spec import TORCH_DTYPES
from fastblt.runtime.prompt_cache import Kept, PromptScores
from fastblt.runtime.state import Snapshot

SHARED_MEMORY = Path("/dev/shm")
DIR_PREFIX = "fastblt-prompts-"
MAGIC = b"fastblt prompt snapshot 1\n"
PREFIX = struct.Struct("<QQ")  # where the header starts, its length
ALIGN = 64
HEADER_MAX = 1 << 20  # bytes: a header past this is not one of ours
FIELDS = (("n", int), ("g_len", int), ("lane", int), ("rank", int), ("linear", dict), ("arrays", list))
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
log = logging.getLogger("fastblt.prompts")


def share_dir(root: Path = SHARED_MEMORY) -> Path | None:
    """A new directory (this user's alone) for one engine's snapshot files, or None where `root` is
    missing or not writable. Directories whose engine's process is gone are removed first."""
    if not root.is_dir() or not os.access(root, os.W_OK | os.X_OK):
        return None
    remove_orphans(root)
    try:
        return Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{_pid_space()}-{os.getpid()}-", dir=root))
    except OSError:
        return None


def remove_orphans(root: Path = SHARED_MEMORY) -> None:
    """Remove this user's snapshot directories whose engine's process no longer exists. Only those
    named in this process's PID namespace: containers may share /dev/shm but not their PIDs."""
    prefix = f"{DIR_PREFIX}{_pid_space()}-"
    with contextlib.suppress(OSError):
        for path in root.glob(f"{prefix}*-*"):
            pid = path.name[len(prefix) :].split("-", 1)[0]
            with contextlib.suppress(OSError, ValueError):
                if path.stat().st_uid == os.getuid() and not _alive(int(pid)):
                    shutil.rmtree(path, ignore_errors=True)


def _pid_space() -> int:
    """This process's PID namespace (0 where /proc does not say)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_dir(path: Path | None) -> None:
    """Remove an engine's snapshot directory and every file in it (lanes that still map one keep it)."""
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


class SnapshotFiles:
    """One lane's view of its engine's snapshot directory: publish its own snapshots there, find
    the other lanes' (PromptCache calls these; they never raise on a file's account)."""

    def __init__(self, directory: Path | str, lane: int):
        self.dir, self.lane = Path(directory), lane
        self._own: dict[bytes, int] = {}  # key -> inode of the file this lane wrote
        self._told_full = False
        for path in self.dir.iterdir() if self.dir.is_dir() else []:  # left by this lane's worker before a restart
            if path.name.endswith(f".{lane}.tmp") or _owner(path) == lane:
                with contextlib.suppress(OSError):
                    path.unlink()

    def path(self, key: bytes) -> Path:
        return self.dir / key.hex()

    def publish(self, key: bytes, kept: Kept) -> Kept | None:
        """Write `kept` into the file of `key` and return it mapped from there (the caller lets the
        copy it gave go), or None when it is not written: another lane's file holds the key, or
        the file system refused (full, gone)."""
        final, tmp = self.path(key), self.dir / f"{key.hex()}.{self.lane}.tmp"
        try:
            _write(tmp, kept, self.lane)
            if self._holds(key):
                os.replace(tmp, final)  # a snapshot serving more requests replaces our own
            else:
                os.link(tmp, final)  # FileExistsError: another lane's
                os.unlink(tmp)
            self._own[key] = final.stat().st_ino
            mapped = _read(final)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if e.errno in (errno.ENOSPC, errno.EDQUOT) and not self._told_full:
                self._told_full = True
                log.warning("fastblt lane %d: %s is full: its prompt snapshots stay in its own memory, unshared "
                            "(give /dev/shm more room, e.g. docker --shm-size, or serve --no-share-prompts)",
                            self.lane, self.dir.parent)  # fmt: skip
            return None
        return mapped

    def find(self, key: bytes, top_n: int | None = None) -> Kept | None:
        """Another lane's snapshot under `key` serving a request scoring its prompt with `top_n` top
        ids (None: one that does not score it), or None; a file found is touched (`touched`)."""
        if key in self._own:
            return None  # our own: the cache already holds it
        path = self.path(key)
        kept = _read(path)
        if kept is None or (top_n is not None and kept.rank < top_n):
            return None
        with contextlib.suppress(OSError):
            now = time.time()  # given: a file system's own clock may run a tick behind time.time()
            os.utime(path, (now, now))
        return kept

    def serves(self, key: bytes, rank: int) -> bool:
        """Whether another lane's file under `key` serves what a snapshot of `rank` would."""
        if key in self._own:
            return False
        header = _header(self.path(key))
        return header is not None and header["rank"] >= rank

    def touched(self, key: bytes) -> float:
        """When another lane last loaded this lane's file of `key` (or it was written), in
        time.time() seconds; 0 when there is none."""
        try:
            return self.path(key).stat().st_mtime
        except OSError:
            return 0.0

    def remove(self, key: bytes) -> None:
        """Remove this lane's file of `key` (a file another lane put there since is left alone)."""
        inode = self._own.pop(key, None)
        if inode is not None and self._inode(key) == inode:
            with contextlib.suppress(OSError):
                self.path(key).unlink()

    def _holds(self, key: bytes) -> bool:
        """Whether the file of `key` is the one this lane wrote."""
        return self._own.get(key) is not None and self._inode(key) == self._own[key]

    def _inode(self, key: bytes) -> int | None:
        try:
            return self.path(key).stat().st_ino
        except OSError:
            return None


def _owner(path: Path) -> int | None:
    """The lane that wrote a published file (from its header), None for anything else."""
    header = None if path.name.endswith(".tmp") else _header(path)
    return None if header is None else header.get("lane")


def _blocks(t: torch.Tensor) -> list[torch.Tensor]:
    """`t` as contiguous pieces in row-major order (a cache's prefix is one per layer and head)."""
    return [t] if t.is_contiguous() else [b for sub in t for b in _blocks(sub)]


def _arrays(kept: Kept) -> list[tuple[str, torch.Tensor | np.ndarray]]:
    """Everything a snapshot holds, named, in file order."""
    snap, out = kept.snap, []
    out += [(f"rows.{i}", t) for i, t in enumerate(snap.rows)]
    for name, kv in snap.linear.items():
        out += [(f"linear.{name}.{i}.{j}", t) for i, pair in enumerate(kv) for j, t in enumerate(pair)]
    out += [("h", snap.h), *((f"host.{name}", a) for name, a in snap.host.items())]
    if kept.scores is not None:
        s = kept.scores
        out += [("scores.logprobs", s.logprobs), ("scores.top_ids", s.top_ids), ("scores.top_logprobs", s.top_logprobs)]
    return out


def _write(path: Path, kept: Kept, lane: int) -> None:
    """The snapshot file: MAGIC, PREFIX, each array at a multiple of ALIGN, then the JSON header
    naming their dtypes, shapes and offsets."""
    snap, entries = kept.snap, []
    with open(path, "xb") as f:
        f.write(MAGIC + PREFIX.pack(0, 0))
        for name, a in _arrays(kept):
            at = -(-f.tell() // ALIGN) * ALIGN
            f.write(b"\0" * (at - f.tell()))
            if isinstance(a, torch.Tensor):
                dtype = DTYPE_NAMES[a.dtype]
                for block in _blocks(a):
                    f.write(memoryview(block.view(torch.uint8).numpy().reshape(-1)))
            else:
                dtype = a.dtype.str
                f.write(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
            entries.append([name, dtype, list(a.shape), at])
        header = json.dumps({"n": snap.n, "g_len": snap.g_len, "lane": lane, "rank": kept.rank,
                             "linear": {name: len(kv) for name, kv in snap.linear.items()},
                             "arrays": entries}).encode()  # fmt: skip
        at = f.tell()
        f.write(header)
        f.seek(len(MAGIC))
        f.write(PREFIX.pack(at, len(header)))


def _header(path: Path, data: bytes | mmap.mmap | None = None) -> dict | None:
    """A snapshot file's header, or None when the file is missing or not a whole snapshot file."""
    try:
        if data is None:
            with open(path, "rb") as f:
                head = f.read(len(MAGIC) + PREFIX.size)
                at, length = PREFIX.unpack(head[len(MAGIC) :])
                if not head.startswith(MAGIC) or length > HEADER_MAX:
                    return None
                f.seek(at)
                raw = f.read(length)
        else:
            at, length = PREFIX.unpack(data[len(MAGIC) : len(MAGIC) + PREFIX.size])
            raw = data[at : at + length] if data[: len(MAGIC)] == MAGIC and length <= HEADER_MAX else b""
        header = json.loads(raw)
        return header if isinstance(header, dict) and all(isinstance(header.get(k), t) for k, t in FIELDS) else None
    except (OSError, ValueError, struct.error):
        return None


def _read(path: Path) -> Kept | None:
    """The snapshot in a file, its arrays views of a private mapping of it, or None when the file is
    missing or is not a whole snapshot file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            memory = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        header = _header(path, memory)
        if header is None:
            return None
        arrays = {}
        for name, dtype, shape, at in header["arrays"]:
            count = int(np.prod(shape, dtype=np.int64))
            if dtype in TORCH_DTYPES:
                t = torch.frombuffer(memory, dtype=TORCH_DTYPES[dtype], count=count, offset=at) if count else None
                arrays[name] = (t if t is not None else torch.zeros(0, dtype=TORCH_DTYPES[dtype])).view(shape)
            else:
                arrays[name] = np.frombuffer(memory, dtype=np.dtype(dtype), count=count, offset=at).reshape(shape)
        rows = [arrays[f"rows.{i}"] for i in range(sum(n.startswith("rows.") for n in arrays))]
        linear = {name: [(arrays[f"linear.{name}.{i}.0"], arrays[f"linear.{name}.{i}.1"]) for i in range(layers)]
                  for name, layers in header["linear"].items()}  # fmt: skip
        host = {n.split(".", 1)[1]: a for n, a in arrays.items() if n.startswith("host.")}
        snap = Snapshot(header["n"], header["g_len"], rows, linear, host, arrays["h"])
        scores = None
        if "scores.logprobs" in arrays:
            scores = PromptScores(arrays["scores.logprobs"], arrays["scores.top_ids"], arrays["scores.top_logprobs"])
        return Kept(snap, scores)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError):
        return None
