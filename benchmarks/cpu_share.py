"""How much of the machine's CPU other processes took while a benchmark ran.

The cores are shared with whatever else runs: a timing taken while another process is busy
is slower, so every benchmark reports this share beside its numbers. Reads Linux's
/proc/stat; steal time (the hypervisor serving other guests) counts as taken.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_STAT = Path("/proc/stat")


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    fields = [int(v) for v in _STAT.read_text().split("\n", 1)[0].split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / tick, sum(fields) / tick


def own_cpu_s() -> float:
    """CPU seconds of this process and its finished children."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


class CpuWatch:
    """Started when made (or by `start()`); `others_share()` is the share since then, and
    `stop()` keeps it in `share` (None before)."""

    def __init__(self) -> None:
        self.share: float | None = None
        self.start()

    def start(self) -> None:
        self.busy0, self.total0 = machine_cpu_s()
        self.own0 = own_cpu_s()

    def others_share(self) -> float:
        busy1, total1 = machine_cpu_s()
        others = (busy1 - self.busy0) - (own_cpu_s() - self.own0)
        return max(0.0, others / max(total1 - self.total0, 1e-9))

    def stop(self) -> None:
        self.share = self.others_share()


@contextmanager
def others_cpu(record: dict[str, float], key: str) -> Iterator[None]:
    """Record in record[key] the share other processes took during the block (nothing where
    /proc/stat is missing)."""
    if not _STAT.exists():
        yield
        return
    watch = CpuWatch()
    yield
    record[key] = watch.others_share()
