"""The fork server behind worker lanes, with stdlib functions as the workers' entry points: pids,
exit codes (a worker's own, and -signal), a worker that outlives nothing, closing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fastblt.runtime import zygote as zy

pytestmark = pytest.mark.skipif(not zy.available(), reason="the zygote forks workers on Linux only")


def start(entry: str) -> zy.Zygote:
    return zy.Zygote(entry, ("json",), "fastblt-test")


def fork(z: zy.Zygote) -> tuple[zy.Forked, socket.socket]:
    ours, theirs = socket.socketpair()
    with theirs:
        return z.fork(theirs.fileno()), ours


def test_a_worker_gets_its_socket_and_its_exit_code_comes_back():
    z = start("sys:exit")  # the worker calls sys.exit(fd): its exit code is the fd it was given
    try:
        worker, ours = fork(z)
        code = worker.wait(30)
        assert 3 <= code < 1024 and worker.poll() == code and worker.pid != z.pid
        ours.close()
    finally:
        z.close()


def test_a_killed_worker_reports_its_signal_and_a_running_one_none():
    z = start("time:sleep")  # sleeps fd seconds
    try:
        worker, ours = fork(z)
        assert worker.poll() is None
        deadline = time.monotonic() + 10  # the worker names itself just after the fork
        while comm(worker.pid) != "fastblt-test" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert comm(worker.pid) == "fastblt-test" and comm(z.pid) == "fastblt-zygote"
        with pytest.raises(subprocess.TimeoutExpired):
            worker.wait(0.1)
        worker.kill()
        assert worker.wait(30) == -signal.SIGKILL
        ours.close()
    finally:
        z.close()


def test_closing_ends_the_zygote_and_forking_after_it_fails_cleanly():
    z = start("sys:exit")
    pid = z.pid
    z.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the zygote still runs after close")
    with pytest.raises(OSError):
        fork(z)


def test_a_zygote_that_cannot_import_says_so():
    with pytest.raises(OSError, match="zygote: exited while importing"):
        zy.Zygote("sys:exit", ("no_such_module_here",), "fastblt-test", timeout=60)


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def test_a_worker_that_ended_is_not_running_when_the_zygote_is_gone():
    """With the zygote gone, a worker's end is asked of the kernel: a zombie has ended (a child of
    ours, as orphans are under a child subreaper, is reaped), a live process has not."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not zy._exists(pid)
    assert not Path(f"/proc/{pid}").exists()  # reaped, not left a zombie
    assert zy._exists(os.getpid())


def test_a_zombie_that_is_not_ours_has_ended():
    """A worker whose parent (a zygote) no longer reaps it is a zombie this process cannot reap:
    it has ended all the same (kill(pid, 0) still finds it)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # a stand-in for the zygote: forks a worker that exits at once, and never reaps it
        grandchild = os.fork()
        if grandchild == 0:
            os._exit(0)
        os.write(write, grandchild.to_bytes(4, "little"))
        time.sleep(30)
        os._exit(0)
    try:
        os.close(write)
        worker = int.from_bytes(os.read(read, 4), "little")
        deadline = time.monotonic() + 10
        while Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(worker, 0)  # still there for the kernel's purposes
        assert not zy._exists(worker)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(read)
