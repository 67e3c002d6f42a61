"""The training corpus of the embedded default: CPython's own standard-library `.py` files.

Files come from `sysconfig.get_paths()["stdlib"]` in sorted relative-path order. We leave out
`site-packages` (not CPython's code). The test directories (`test`, `tests`, `idle_test`, ~60% of
the stdlib's bytes) join the training side only with `include_tests`: `Corpus.load` defaults to
library code, while `fastblt train` trains with them unless told `--without-tests`, since a
135-minute trial found the extra data worth 0.15 held-out bits/byte (library code alone is seen
three times and memorised). The held-out files are a fixed, committed list
(`fastblt/assets/heldout_files.txt`, drawn from the library and its tests alike, >= 5% of both)
so that every Python version evaluates on the same files; files of the list that this Python
lacks are skipped and counted. Held-out test files stay held out when the tests do not train.

Token ids are byte + 4 with BOS (1) prepended (fastblt/model/tokenizer.py).
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastblt.errors import InputError
from fastblt.model.config import BOS_ID, BYTE_OFFSET

HELDOUT_LIST = Path(__file__).resolve().parent.parent / "assets" / "heldout_files.txt"
# the first 18-file list (all still held out): the headline files of defaults trained on library code only
PREVIOUS_HELDOUT_LIST = HELDOUT_LIST.with_name("heldout_files_until_2026-12-03.txt")
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
EXCLUDED_DIRS = frozenset({"site-packages", "__pycache__"}) | TEST_DIRS
HELDOUT_FRACTION = 0.06  # of corpus bytes: over 5%, so that held-out numbers do not hang on a few files


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def in_test_dir(rel: str) -> bool:
    """Whether the relative path `rel` lies in one of the stdlib's test directories."""
    return bool(TEST_DIRS & set(rel.split("/")[:-1]))


def list_corpus_files(root: Path | None = None, include_tests: bool = False) -> list[str]:
    """Sorted relative paths (POSIX) of the corpus's `.py` files under `root` (default: stdlib);
    `include_tests` keeps the test directories (a training-data trial; the held-out list is unchanged)."""
    root = stdlib_dir() if root is None else Path(root)
    excluded = EXCLUDED_DIRS - TEST_DIRS if include_tests else EXCLUDED_DIRS
    out = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        if excluded & set(rel.parts[:-1]) or not f.is_file():
            continue
        out.append(rel.as_posix())
    return sorted(out)


def choose_heldout(root: Path | None = None, fraction: float = HELDOUT_FRACTION) -> list[str]:
    """The deterministic held-out choice: files of the library and its test directories in order of
    sha256(path), until `fraction` of their bytes.

    Used once to write the committed list; training reads the list, never recomputes it. Over
    library code alone the same rule chose 18 files (PREVIOUS_HELDOUT_LIST); they come first in the
    same order, so the list grew around them when the test directories joined the corpus.
    """
    root = stdlib_dir() if root is None else Path(root)
    files = list_corpus_files(root, include_tests=True)
    sizes = {f: (root / f).stat().st_size for f in files}
    total, acc, chosen = sum(sizes.values()), 0, []
    for f in sorted(files, key=lambda p: hashlib.sha256(p.encode()).hexdigest()):
        if acc >= fraction * total:
            break
        chosen.append(f)
        acc += sizes[f]
    return sorted(chosen)


def read_heldout_list(path: Path = HELDOUT_LIST) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def heldout_list_digest(path: Path = HELDOUT_LIST) -> str:
    """sha256 of the held-out file names (comments aside): a run records it, so that a resume under
    another list, which would train on other files, is refused."""
    return hashlib.sha256("\n".join(sorted(read_heldout_list(path))).encode()).hexdigest()


@dataclass
class Corpus:
    """Train/held-out split of the stdlib files, each side one concatenated uint8 array."""

    root: Path
    train_files: list[str]
    heldout_files: list[str]
    missing_heldout: list[str]
    train_bytes: np.ndarray  # (n_train_bytes,) uint8, files concatenated in order
    train_offsets: np.ndarray  # (n_files + 1,) int64 start of each file in train_bytes
    heldout_texts: list[bytes]

    @classmethod
    def load(
        cls,
        root: Path | None = None,
        heldout_list: Path = HELDOUT_LIST,
        limit_bytes: int | None = None,
        include_tests: bool = False,
    ) -> Corpus:
        """Read the corpus; `limit_bytes` keeps only the first files up to that many train bytes (smoke);
        `include_tests` adds the test directories to the training side."""
        root = stdlib_dir() if root is None else Path(root)
        files = list_corpus_files(root, include_tests)
        listed = read_heldout_list(heldout_list)
        present = set(files if include_tests else list_corpus_files(root, include_tests=True))
        heldout = [f for f in listed if f in present]
        missing = [f for f in listed if f not in present]
        held = set(heldout)
        train = [f for f in files if f not in held]
        chunks, offsets, n = [], [0], 0
        for f in train:
            data = (root / f).read_bytes()
            chunks.append(data)
            n += len(data)
            offsets.append(n)
            if limit_bytes is not None and n >= limit_bytes:
                train = train[: len(chunks)]
                break
        if n == 0:
            raise InputError(f"corpus: no training files found under {root}")
        arr = np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()
        texts = [(root / f).read_bytes() for f in heldout]
        return cls(root, train, heldout, missing, arr, np.asarray(offsets, dtype=np.int64), texts)

    @property
    def n_train_bytes(self) -> int:
        return int(self.train_bytes.shape[0])

    @property
    def n_heldout_bytes(self) -> int:
        return sum(len(t) for t in self.heldout_texts)

    def sample(self, batch: int, n_bytes: int, gen: torch.Generator) -> Tensor:
        """Random training windows: (batch, 1 + n_bytes) int64 token ids, BOS first.

        A window starts at a uniformly random byte and is moved back so it ends inside the same
        file; only a file shorter than the window lets it run into the next file(s).
        """
        total = self.n_train_bytes
        if total <= n_bytes:
            raise InputError(f"corpus: {total} training bytes cannot fill a window of {n_bytes}")
        pos = torch.randint(0, total, (batch,), generator=gen).numpy()
        f = np.searchsorted(self.train_offsets, pos, side="right") - 1  # file of each start
        file_end = self.train_offsets[f + 1]
        start = np.maximum(self.train_offsets[f], np.minimum(pos, file_end - n_bytes))
        start = np.minimum(start, total - n_bytes)
        idx = start[:, None] + np.arange(n_bytes)[None, :]  # (batch, n_bytes)
        return windows_to_tokens(torch.from_numpy(self.train_bytes[idx].astype(np.int64)))

    def heldout_window_index(
        self, n_bytes: int = 1024, max_windows: int | None = 128, only: set[str] | None = None
    ) -> list[tuple[int, int]]:
        """(held-out file index, byte offset) of the windows `heldout_windows` returns, in order.

        All full non-overlapping windows of every held-out file (of those named in `only`, if given)
        in list order, then `max_windows` of them taken at evenly spaced indices (deterministic).
        """
        files = [(i, t) for i, t in enumerate(self.heldout_texts) if only is None or self.heldout_files[i] in only]
        index = [(i, s) for i, t in files for s in range(0, len(t) - n_bytes + 1, n_bytes)]
        if not index:
            raise InputError(f"corpus: no held-out file has {n_bytes} bytes")
        return _evenly_spaced(index, max_windows)

    def heldout_windows(
        self, n_bytes: int = 1024, max_windows: int | None = 128, only: set[str] | None = None
    ) -> Tensor:
        """Non-overlapping held-out windows: (W, 1 + n_bytes) int64 tokens, BOS first (see heldout_window_index)."""
        return self._windows(self.heldout_window_index(n_bytes, max_windows, only), n_bytes)

    def file_windows(self, file: int, n_bytes: int = 1024, max_windows: int | None = 32) -> Tensor | None:
        """Evenly spaced full windows of one held-out file (None if it is shorter than a window)."""
        index = [(file, s) for s in range(0, len(self.heldout_texts[file]) - n_bytes + 1, n_bytes)]
        return self._windows(_evenly_spaced(index, max_windows), n_bytes) if index else None

    def code_windows(self, per_file: int = 8, n_bytes: int = 1024) -> Tensor:
        """Up to `per_file` windows of every held-out file but the largest (`pydoc_data/topics.py`,
        English prose: 41% of the headline windows, 84% on the 18-file list): held-out code alone."""
        largest = max(range(len(self.heldout_files)), key=lambda i: len(self.heldout_texts[i]))
        parts = [self.file_windows(i, n_bytes, per_file) for i in range(len(self.heldout_files)) if i != largest]
        return torch.cat([w for w in parts if w is not None])

    def _windows(self, index: list[tuple[int, int]], n_bytes: int) -> Tensor:
        rows = [np.frombuffer(self.heldout_texts[f][s : s + n_bytes], dtype=np.uint8) for f, s in index]
        return windows_to_tokens(torch.from_numpy(np.stack(rows).astype(np.int64)))


def _evenly_spaced(items: list, n: int | None) -> list:
    """`n` of `items` at evenly spaced indices, first and last included (all if n is None or larger)."""
    if n is None or len(items) <= n:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(np.int64)]


def windows_to_tokens(byte_windows: Tensor) -> Tensor:
    """(B, n) int64 byte values -> (B, 1 + n) token ids, BOS first."""
    bos = torch.full((byte_windows.shape[0], 1), BOS_ID, dtype=torch.int64)
    return torch.cat([bos, byte_windows + BYTE_OFFSET], dim=1)
