"""Cores and memory as a container sees them: CPU affinity and quota, MemAvailable and the cgroup's
memory limit, in both cgroup versions (fake /sys/fs/cgroup trees)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastblt import machine


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


AFFINITY = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "250000 100000\n"}, 2.5),  # v2: docker --cpus 2.5
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.0),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbage\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "x\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cpu_quota_reads_both_cgroup_versions(tmp_path, files, quota):
    root = tree(tmp_path, files)
    assert machine.cpu_quota(root) == quota
    want = AFFINITY if quota is None else max(1, min(AFFINITY, -(-quota // 1)))
    assert machine.cpu_cores(root) == want


def test_a_quota_below_the_affinity_lowers_the_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert machine.cpu_cores(tree(tmp_path / "a", {"cpu.max": "400000 100000"})) == 4
    assert machine.cpu_cores(tree(tmp_path / "b", {"cpu.max": "50000 100000"})) == 1  # half a core: one
    assert machine.cpu_cores(tree(tmp_path / "c", {"cpu.max": "max 100000"})) == 64


MEMINFO = "MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n"
GB = 1 << 30


@pytest.mark.parametrize(
    ("files", "want"),
    [
        ({}, 20000000 * 1024),  # no cgroup files: the host's MemAvailable
        ({"memory.max": f"{4 * GB}\n", "memory.current": f"{GB}\n"}, 3 * GB),  # v2 limit
        ({"memory.max": "max\n", "memory.current": f"{GB}\n"}, 20000000 * 1024),
        ({"memory/memory.limit_in_bytes": f"{2 * GB}\n", "memory/memory.usage_in_bytes": f"{GB // 2}\n"}, 3 * GB // 2),
        ({"memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "5\n"},
         20000000 * 1024),  # v1's "no limit"
        ({"memory.max": f"{GB}\n", "memory.current": f"{2 * GB}\n"}, 0),  # over its limit already
    ],
)  # fmt: skip
def test_memory_available_is_the_lesser_of_host_and_cgroup(tmp_path, files, want):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    assert machine.memory_available(tree(tmp_path / "cg", files), meminfo) == want


def test_memory_unknown_when_nothing_can_be_read(tmp_path):
    assert machine.memory_available(tmp_path / "none", tmp_path / "no-meminfo") is None
    limit = tree(tmp_path / "cg", {"memory.max": f"{GB}\n", "memory.current": "0\n"})
    assert machine.memory_available(limit, tmp_path / "no-meminfo") == GB


def test_this_machine_reads_sensibly():
    assert 1 <= machine.cpu_cores() <= (os.cpu_count() or 1)
    available = machine.memory_available()
    assert available is None or available > 0
