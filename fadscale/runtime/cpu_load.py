"""How busy the machine was while a block ran: benchmarks record it beside their timings, since a busy
neighbour slows a step several-fold on a small machine (the tools/ benchmarks are its users)."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (every process, other users' too), from /proc/stat (NaN
    elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """How many CPUs other processes kept busy while a block ran (benchmarks record it beside their timings):
    the machine's busy time minus this process's own (`children=False`) or, for a block that runs child
    processes and waits for them, the children's, over the block's wall time (`.wall`, `.cpus`)."""

    def __init__(self, children: bool = False):
        self._who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF

    def _own_cpu(self) -> float:
        usage = resource.getrusage(self._who)
        return usage.ru_utime + usage.ru_stime

    def __enter__(self) -> "OtherLoad":
        self._busy, self._own, self._start = busy_cpu_seconds(), self._own_cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._start
        others = busy_cpu_seconds() - self._busy - (self._own_cpu() - self._own)
        self.cpus = max(0.0, others / self.wall)
