"""A fork server for worker lanes: one fresh interpreter imports the runtime, then forks each lane.

A worker lane started as a fresh interpreter imports torch and the runtime itself: ~150 MB of
code and data per worker, the same bytes in every one. Forked from one process that imported
them once, the workers share those pages copy-on-write (the default checkpoint's workers: ~300 MB
each on their own, ~190 MB forked; docs/serving.md). The zygote is itself a fresh interpreter
(not a fork of the caller, whose onnxruntime sessions own threads a fork would not copy) that
imports what a worker needs except onnxruntime, which starts a thread at import: it stays
single-threaded (OpenBLAS is told to start no pool), so a fork copies a process in a consistent
state. Linux only (elsewhere, and whenever the zygote cannot start, lanes start as fresh
interpreters).

Over one SOCK_SEQPACKET socket, each request is a 9-byte message answered by one: "F" with a
socket attached (SCM_RIGHTS) -> the pid of a new worker that calls the entry point with it;
"S" + pid -> that worker's exit code once it has ended (-signal when a signal ended it), else
RUNNING. The zygote reaps its workers, ignores SIGINT and SIGTERM (its caller decides when lanes
end) and exits when the socket closes; its workers end when their own sockets close, so none
outlives the caller.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

RUNNING = -(1 << 62)  # "S": not ended yet
_MSG = 9


def available() -> bool:
    """Whether lanes can be forked from a zygote here."""
    return sys.platform == "linux" and hasattr(socket, "send_fds")


def set_name(name: str) -> None:
    """The process's name in ps, top and /proc/PID/comm (Linux; 15 bytes at most)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


class Zygote:
    """The caller's side: start the zygote, fork workers from it, ask how they ended.

    Args:
        entry: "module:function" a forked worker calls with its socket's file descriptor.
        preload: modules the zygote imports before forking (every worker shares them).
        name: the workers' process name (ps, top); the zygote's is "fastblt-zygote".
    """

    def __init__(self, entry: str, preload: tuple[str, ...], name: str, timeout: float = 120.0):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            env = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
            cmd = [sys.executable, "-c", "from fastblt.runtime.zygote import main; main()", str(theirs.fileno()),
                   entry, name, *preload]  # fmt: skip
            self._proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        self._sock, self._lock = ours, threading.Lock()
        ready, _, _ = select.select([ours], [], [], timeout)
        if not ready or self._sock.recv(_MSG) != b"R" + bytes(8):
            self.close()
            why = f"not ready after {timeout:.0f} s" if not ready else "exited while importing"
            raise OSError(f"zygote: {why} (exit code {self._proc.poll()})")

    @property
    def pid(self) -> int:
        return self._proc.pid

    def fork(self, fd: int) -> Forked:
        """A worker serving the lane socket `fd` (lane_process.serve), forked from the zygote."""
        with self._lock:
            socket.send_fds(self._sock, [b"F" + bytes(8)], [fd])
            return Forked(self, self._answer())

    def exit_code(self, pid: int) -> int | None:
        """A forked worker's exit code, None while it runs."""
        with self._lock:
            self._sock.sendall(b"S" + pid.to_bytes(8, "little", signed=True))
            code = self._answer()
        return None if code == RUNNING else code

    def _answer(self) -> int:
        msg = self._sock.recv(_MSG)
        if len(msg) != _MSG:
            raise OSError(f"zygote: exited (exit code {self._proc.poll()})")
        return int.from_bytes(msg[1:], "little", signed=True)

    def close(self) -> None:
        """End the zygote (its workers end when their lane sockets close)."""
        self._sock.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)


class Forked:
    """A worker forked by the zygote, with the subset of subprocess.Popen that ProcessLane uses.

    Not the caller's child, so the zygote reaps it and reports its exit code.
    """

    def __init__(self, zygote: Zygote, pid: int):
        self.zygote, self.pid = zygote, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.returncode = self.zygote.exit_code(self.pid)
            except OSError:  # the zygote is gone: ask the kernel whether the worker is
                self.returncode = None if _exists(self.pid) else -1
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
            time.sleep(0.02)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def _exists(pid: int) -> bool:
    """Whether a worker whose zygote is gone still runs. Its workers are orphans then: one that
    came to this process (a child subreaper, e.g. PID 1 of a container) is reaped here, and one
    that ended but nobody reaped yet (a zombie) has ended."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


# ---------------------------------------------------------------------- the zygote
def main() -> None:
    """The zygote's entry point: argv is its socket's file descriptor, the workers' entry point
    ("module:function") and name, then the modules to preload."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    set_name("fastblt-zygote")
    fd, entry, name, *preload = sys.argv[1:]
    sock = socket.socket(fileno=int(fd))
    for module in preload:
        importlib.import_module(module)
    # the imported objects to the permanent generation: a worker's collections then leave their
    # pages unwritten, and so shared (a collection writes to every object it tracks)
    gc.freeze()
    sock.sendall(b"R" + bytes(8))
    ended: dict[int, int] = {}
    while True:
        ready, _, _ = select.select([sock], [], [], 1.0)
        _reap(ended)
        if not ready:
            continue
        try:
            msg, fds, _, _ = socket.recv_fds(sock, _MSG, 1)
        except OSError:
            msg, fds = b"", []
        if len(msg) != _MSG:
            break  # the caller is gone
        if msg[:1] == b"F" and fds:
            pid = os.fork()
            if pid == 0:
                sock.close()
                _worker(entry, name, fds[0])
            os.close(fds[0])
            sock.sendall(b"P" + pid.to_bytes(8, "little", signed=True))
        elif msg[:1] == b"S":
            pid = int.from_bytes(msg[1:], "little", signed=True)
            _reap(ended)
            sock.sendall(b"C" + ended.get(pid, RUNNING).to_bytes(8, "little", signed=True))
    for _ in range(50):  # a moment for workers that are ending to be reaped
        _reap(ended)
        time.sleep(0.01)


def _reap(ended: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        ended[pid] = os.waitstatus_to_exitcode(status)


def _worker(entry: str, name: str, fd: int) -> None:
    """The forked worker: run its entry point, then leave without running the zygote's exit
    handlers."""
    code = 0
    try:
        set_name(name)
        module, function = entry.split(":")
        getattr(importlib.import_module(module), function)(fd)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException:  # noqa: BLE001 (reported like an uncaught exception, then the exit code says it)
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
