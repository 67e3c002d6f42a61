"""What the machine lends this process: cores and memory, as a container sees them.

`os.cpu_count()` and /proc/meminfo describe the host. A process pinned to some cores (taskset,
a cpuset) or in a container with a CPU quota (`docker --cpus 4`, a Kubernetes CPU limit) or a
memory limit gets less, and sizing lanes by the host's numbers would start a worker per host core
and fight over the few the quota allows. Both cgroup versions are read; a limit that cannot be
read counts as none.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
MEMINFO = Path("/proc/meminfo")


def cpu_cores(cgroup: Path = CGROUP) -> int:
    """Cores this process may run on: its CPU affinity, lowered to its cgroup's CPU quota (rounded
    up: a quota of 2.5 cores lets three run part of the time)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota(cgroup)
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def cpu_quota(cgroup: Path = CGROUP) -> float | None:
    """The cgroup's CPU limit in cores (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us` over
    `cpu.cfs_period_us`), None when unlimited or unreadable."""
    v2 = _read(cgroup / "cpu.max")
    if v2 is not None:
        parts = v2.split()
        if len(parts) == 2 and parts[0] != "max":
            return _ratio(parts[0], parts[1])
        return None
    quota, period = _read(cgroup / "cpu" / "cpu.cfs_quota_us"), _read(cgroup / "cpu" / "cpu.cfs_period_us")
    if quota is None or period is None or quota.strip() == "-1":
        return None
    return _ratio(quota, period)


def memory_available(cgroup: Path = CGROUP, meminfo: Path = MEMINFO) -> int | None:
    """Bytes this process could still take: the host's MemAvailable, lowered to what its cgroup's
    memory limit leaves (limit minus usage); None when neither can be read."""
    host = None
    text = _read(meminfo)
    for line in (text or "").splitlines():
        if line.startswith("MemAvailable:"):
            host = int(line.split()[1]) * 1024
    left = _cgroup_memory_left(cgroup)
    known = [v for v in (host, left) if v is not None]
    return min(known) if known else None


def _cgroup_memory_left(cgroup: Path) -> int | None:
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # fmt: skip
        limit, usage = _read(cgroup / limit_file), _read(cgroup / usage_file)
        if limit is None or usage is None:
            continue
        limit = limit.strip()
        # v1 writes "no limit" as a huge page-rounded number, v2 as "max"
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        if not usage.strip().isdigit():
            return None
        return max(int(limit) - int(usage), 0)
    return None


def _ratio(num: str, den: str) -> float | None:
    try:
        n, d = int(num), int(den)
    except ValueError:
        return None
    return n / d if n > 0 and d > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
