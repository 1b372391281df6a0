"""CPU-contention measurement shared by the benchmarks.

On a small machine other processes (a test suite, a package install) can slow multi-threaded
BLAS calls by large factors; the benchmarks sample ``/proc/stat`` around every timed run, wait
for idle CPUs, and mark runs that others disturbed.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BUSY_THRESHOLD",
    "CpuSample",
    "cpu_busy",
    "cpu_model",
    "cpu_sample",
    "others_share",
]

BUSY_THRESHOLD = 0.15  # share of the CPUs used by other processes that marks a run


@dataclass(frozen=True)
class CpuSample:
    """Jiffies of all CPUs (total, idle) from /proc/stat and this process's CPU seconds."""

    total: int
    idle: int
    own_s: float


def cpu_sample() -> CpuSample | None:
    """Snapshot for :func:`others_share`; None where /proc/stat cannot be read."""
    try:
        line = Path("/proc/stat").read_text().split("\n", 1)[0]
        fields = [int(x) for x in line.split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    except (OSError, ValueError, IndexError):
        return None
    return CpuSample(sum(fields), idle, time.process_time())


def others_share(before: CpuSample | None, after: CpuSample | None) -> float | None:
    """Share of all CPUs used by *other* processes between two samples.

    Busy CPU time minus this process's own (all its threads, BLAS spin-waits included), over
    the CPU time available. None when unknown or too short to tell (under 20 jiffies).
    """
    if before is None or after is None or after.total - before.total < 20:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    available = (after.total - before.total) / hz
    busy = available - (after.idle - before.idle) / hz
    return min(1.0, max(0.0, busy - (after.own_s - before.own_s)) / available)


def cpu_busy(interval: float = 0.3) -> float | None:
    """Share of all CPUs used by other processes over ``interval`` seconds."""
    before = cpu_sample()
    time.sleep(interval)
    return others_share(before, cpu_sample())


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
