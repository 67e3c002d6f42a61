"""Where a server keeps what clients come back for (responses.py's kept responses,
conversations.py's conversations): a least-recently-used map of JSON values bounded by bytes, in
the server's memory, or in a SQLite file that a restarted server reads again.

Both hold JSON-able values and count each by its JSON's length; `put` keeps a value and lets the
least recently used others go until the map is back within its budget. A value is read back as
a new object from the file, and as the same object from memory: callers change a value only to
put it again, or through `update`, which reads, changes and puts one value as one step (two
writers changing one value at once both land).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from fastblt.serve.held import hold

FILE = "kept.sqlite3"  # in --response-store-dir
T = TypeVar("T")
TABLES = ("responses", "conversations", "chat_completions")  # what kept.sqlite3 holds, a table each
LOCK = "kept.lock"  # ... held by the one server (or Ray store actor) that keeps its file there (held.py)


class Kept(Protocol):
    budget: int

    @property
    def used(self) -> int: ...

    def get(self, key: str) -> Any | None: ...

    def put(self, key: str, value: Any) -> bool: ...

    def delete(self, key: str) -> bool: ...

    def update(self, key: str, change: Callable[[Any], Any]) -> Any | None:
        """`change(value)` kept under `key`, read and put as one step; the value kept (None: no
        such key, nothing put; or the changed value alone exceeds the budget, and the key is
        gone: what it held is no longer what was asked to be kept). `change` sees its own copy
        and returns the value to keep."""
        ...


def _kept(kept: Kept, key: str, value: Any) -> Any | None:
    """`value` put under `key`, or None, and `key` dropped, when it alone exceeds the budget."""
    if kept.put(key, value):
        return value
    kept.delete(key)
    return None


def size_of(value: Any) -> int:
    """A value's bytes as the budget counts them: its JSON's."""
    return len(json.dumps(value))


class MemoryKept:
    """In this process's memory: gone at a restart. Thread-safe."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self._values: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.RLock()  # update holds it across its get and put

    def get(self, key: str) -> Any | None:
        with self._lock:
            found = self._values.get(key)
            if found is None:
                return None
            self._values.move_to_end(key)
            return found[0]

    def put(self, key: str, value: Any) -> bool:
        """Keep `value` under `key` (the most recently used); False, and nothing kept, when it
        alone exceeds the budget."""
        size = size_of(value)
        if size > self.budget:
            return False
        with self._lock:
            old = self._values.pop(key, None)
            self.used += size - (0 if old is None else old[1])
            self._values[key] = (value, size)
            while self.used > self.budget:
                self.used -= self._values.popitem(last=False)[1][1]
        return True

    def update(self, key: str, change: Callable[[Any], Any]) -> Any | None:
        with self._lock:
            found = self.get(key)
            if found is None:
                return None
            value = change(json.loads(json.dumps(found)))  # its own copy: a failed change leaves the kept one
            return _kept(self, key, value)

    def delete(self, key: str) -> bool:
        with self._lock:
            old = self._values.pop(key, None)
            if old is not None:
                self.used -= old[1]
            return old is not None

    def scan(self, pick: Callable[[str, Any], T | None]) -> list[T]:
        with self._lock:
            kept = [(key, value) for key, (value, _) in self._values.items()]
        return [found for key, value in kept if (found := pick(key, value)) is not None]


class FileKept:
    """In table `table` of a SQLite file (WAL: a reader never waits for a writer), read again by
    the next server that opens it: each put is committed before it returns. Thread-safe (one
    connection, behind a lock)."""

    def __init__(self, path: Path, table: str, budget: int):
        self.budget, self.table = budget, table
        self._lock = threading.RLock()  # update holds it across its get and put
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint; a crash keeps the file whole
        self._db.execute(f"CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
                         "size INTEGER NOT NULL, used INTEGER NOT NULL)")  # fmt: skip
        self._db.execute(f"CREATE INDEX IF NOT EXISTS {table}_used ON {table} (used)")
        self.used, self._clock = self._db.execute(f"SELECT COALESCE(SUM(size), 0), COALESCE(MAX(used), 0) "
                                                  f"FROM {table}").fetchone()  # fmt: skip
        with self._lock:
            self._evict()  # a smaller budget than the last server's

    def get(self, key: str) -> Any | None:
        with self._lock:
            row = self._db.execute(f"SELECT value FROM {self.table} WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            self._clock += 1
            self._db.execute(f"UPDATE {self.table} SET used = ? WHERE key = ?", (self._clock, key))
            return json.loads(row[0])

    def put(self, key: str, value: Any) -> bool:
        text = json.dumps(value)
        if len(text) > self.budget:
            return False
        with self._lock:
            self._clock += 1
            self._db.execute("BEGIN IMMEDIATE")
            try:
                old = self._db.execute(f"SELECT size FROM {self.table} WHERE key = ?", (key,)).fetchone()
                self._db.execute(f"INSERT OR REPLACE INTO {self.table} VALUES (?, ?, ?, ?)",
                                 (key, text, len(text), self._clock))  # fmt: skip
                self.used += len(text) - (0 if old is None else old[0])
                self._evict()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self.used = self._db.execute(f"SELECT COALESCE(SUM(size), 0) FROM {self.table}").fetchone()[0]
                raise
        return True

    def update(self, key: str, change: Callable[[Any], Any]) -> Any | None:
        with self._lock:
            found = self.get(key)  # a new object: the change cannot touch what is kept
            if found is None:
                return None
            value = change(found)
            return _kept(self, key, value)

    def delete(self, key: str) -> bool:
        with self._lock:
            row = self._db.execute(f"DELETE FROM {self.table} WHERE key = ? RETURNING size", (key,)).fetchone()
            if row is not None:
                self.used -= row[0]
            return row is not None

    def scan(self, pick: Callable[[str, Any], T | None]) -> list[T]:
        with self._lock:
            rows = self._db.execute(f"SELECT key, value FROM {self.table}").fetchall()
        return [found for key, text in rows if (found := pick(key, json.loads(text))) is not None]

    def _evict(self) -> None:
        """The least recently used go until the table is within its budget."""
        while self.used > self.budget:
            key, size = self._db.execute(f"SELECT key, size FROM {self.table} ORDER BY used LIMIT 1").fetchone()
            self._db.execute(f"DELETE FROM {self.table} WHERE key = ?", (key,))
            self.used -= size

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Scoped:
    """One project's share of a table (`fastblt serve --project`): its keys are the project's name,
    "/", and the id, so no other project's get, put, delete or scan reaches them; the default
    project ("") keeps plain ids, as a server without projects does, and reaches no key with a "/"
    (an id a client sends that names another project's key is not found). The budget stays the
    table's, shared by every project."""

    def __init__(self, kept: Kept, project: str):
        self.kept, self.prefix = kept, f"{project}/" if project else ""

    @property
    def budget(self) -> int:
        return self.kept.budget

    @property
    def used(self) -> int:
        return self.kept.used

    def _key(self, key: str) -> str | None:
        return None if "/" in key else self.prefix + key

    def get(self, key: str) -> Any | None:
        full = self._key(key)
        return None if full is None else self.kept.get(full)

    def put(self, key: str, value: Any) -> bool:
        full = self._key(key)
        if full is None:  # the server's own ids have none
            raise ValueError(f"kept key {key!r:.80}: has a '/'")
        return self.kept.put(full, value)

    def delete(self, key: str) -> bool:
        full = self._key(key)
        return full is not None and self.kept.delete(full)

    def update(self, key: str, change: Callable[[Any], Any]) -> Any | None:
        full = self._key(key)
        return None if full is None else self.kept.update(full, change)

    def scan(self, pick: Callable[[str, Any], T | None]) -> list[T]:
        return self.kept.scan(InProject(self.prefix, pick))


class InProject:
    """A scan's `pick` over one project's keys (given their ids); a class, so that Ray sends it to
    the store actor by value."""

    def __init__(self, prefix: str, pick: Callable[[str, Any], Any]):
        self.prefix, self.pick = prefix, pick

    def __call__(self, key: str, value: Any) -> Any:
        if not key.startswith(self.prefix) or "/" in key[len(self.prefix) :]:
            return None
        return self.pick(key[len(self.prefix) :], value)


def open_kept(directory: Path | None, table: str, budget: int) -> Kept:
    """A map of `budget` bytes: in `directory`'s SQLite file (made if missing), else in memory."""
    if directory is None:
        return MemoryKept(budget)
    directory.mkdir(parents=True, exist_ok=True)
    return FileKept(directory / FILE, table, budget)


def hold_store(directory: Path) -> None:
    """Take `directory` for this process's store (held.py): InputError if another server has it."""
    hold(directory, LOCK, "responses and conversations")


def check_dir(directory: Path) -> str | None:
    """Why `directory` cannot hold the kept file (made if missing; a file there that is no SQLite
    database of ours is refused, not overwritten), or None."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for table in TABLES:
            FileKept(directory / FILE, table, 1 << 62).close()
    except OSError as e:
        return f"{directory}: {e.strerror}"
    except sqlite3.Error as e:
        return f"{directory / FILE}: {e}"
    return None
