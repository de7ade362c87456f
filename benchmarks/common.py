"""What every benchmark repeats: the environment record, progress logging, timing, the CPU
share other processes took, the aligned tables, the command-line options for where results
go, and writing the JSON result atomically.

The CPU share: the cores are shared with whatever else runs, and a timing taken while another
process is busy is slower, so every benchmark reports this share beside its numbers. It reads
Linux's /proc/stat; steal time (the hypervisor serving other guests) counts as taken.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
STAT = Path("/proc/stat")


# ---------------------------------------------------------------------------------------------
# The environment a run was measured in
# ---------------------------------------------------------------------------------------------

def version(dist: str) -> str | None:
    """The installed version of a distribution (importlib.metadata), None if it is not."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo, else what platform says)."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def environment(threads: int, packages: Sequence[str] = ()) -> dict[str, Any]:
    """What the numbers depend on: machine, CPU, threads, Python, torch, numpy, the load
    average at the start (`finish` adds the one at the end) and the versions of saelab and
    `packages` (None where one is not installed)."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.machine(), "cpu": cpu_name(), "cores": os.cpu_count(),
            "threads": threads, "python": platform.python_version(),
            "executable": sys.executable, "torch": torch.__version__, "numpy": np.__version__,
            "loadavg_start": os.getloadavg(),
            "versions": {d: version(d) for d in dict.fromkeys(("saelab", *packages))}}


def finish(env: dict[str, Any]) -> dict[str, Any]:
    """The environment record with the load average at the end of the run."""
    env["loadavg_end"] = os.getloadavg()
    return env


def load_average(env: dict[str, Any]) -> str:
    """'load average a -> b' (1-minute), from a finished environment record."""
    return (f"load average {env['loadavg_start'][0]:.2f} -> "
            f"{env.get('loadavg_end', os.getloadavg())[0]:.2f}")


# ---------------------------------------------------------------------------------------------
# Progress and timing
# ---------------------------------------------------------------------------------------------

def logger(tag: str) -> Callable[[str], None]:
    """A progress printer: '[tag HH:MM:SS] message' on stderr, so stdout holds only results."""

    def log(msg: str) -> None:
        print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[list[float], Any]:
    """The wall times of `repeats` calls of fn, and the last call's result."""
    times, out = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - began)
    return times, out


def gemm_times(a: torch.Tensor, b: torch.Tensor, reps: int) -> list[float]:
    """Wall times of `reps` products a @ b into a preallocated output (no allocation or page
    faults in the timing), after one untimed product."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)
    torch.mm(a, b, out=out)
    return timed(lambda: torch.mm(a, b, out=out), reps)[0]


# ---------------------------------------------------------------------------------------------
# How much of the machine's CPU other processes took
# ---------------------------------------------------------------------------------------------

def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    fields = [int(v) for v in STAT.read_text().split("\n", 1)[0].split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / tick, sum(fields) / tick


def own_cpu_s() -> float:
    """CPU seconds of this process and its finished children."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


class CpuWatch:
    """Started when made (or by `start()`); `others_share()` is the share of the machine's
    CPU other processes took since then, and `stop()` keeps it in `share` (None before)."""

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
    if not STAT.exists():
        yield
        return
    watch = CpuWatch()
    yield
    record[key] = watch.others_share()


# ---------------------------------------------------------------------------------------------
# Child processes, tables, results
# ---------------------------------------------------------------------------------------------

class ChildFailed(RuntimeError):
    """A measuring subprocess exited non-zero or printed no result; the message is the last
    line of its stderr."""


def json_child(cmd: Sequence[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run a measuring subprocess and return the JSON object on the last line of its stdout."""
    proc = subprocess.run(list(cmd), env=env, capture_output=True, text=True, check=False,
                          timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise ChildFailed((err[-1] if err else f"exit status {proc.returncode}")[:300])
    return json.loads(lines[-1])


def render_table(head: Sequence[str], rows: Sequence[Sequence[str]], *,
                 left: Sequence[int] = (0,), title: str | None = None) -> str:
    """An aligned text table, a rule under the header: the columns in `left` (negative counts
    from the end) left-aligned, the others right-aligned. A row shorter than the header runs
    its last cell on unaligned (an error message in place of the numbers); an empty row is a
    blank line."""
    n = len(head)
    lefts = {i % n for i in left}
    full = [row for row in rows if len(row) == n]
    widths = [max(len(cell) for cell in col) for col in zip(head, *full, strict=True)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            if len(cells) < n and i == len(cells) - 1:
                out.append(cell)
            else:
                out.append(cell.ljust(widths[i]) if i in lefts else cell.rjust(widths[i]))
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([*([title] if title else []), line(head), rule, *map(line, rows)])


def add_output_args(parser: argparse.ArgumentParser, name: str, quick: str, smoke: str) -> None:
    """--out, --quick and --smoke, the same in every benchmark. `quick` and `smoke` say what
    those runs do; a smoke run (tiny sizes, one repeat: proof that the script still runs)
    writes to a temporary file unless --out says otherwise, never to benchmarks/results/."""
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON results file (default {RESULTS.name}/{name}.json; "
                        "with --smoke a temporary file)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {quick}")
    parser.add_argument("--smoke", action="store_true",
                        help=f"smallest run, to prove the script runs: {smoke}; writes to a "
                        "temporary file")


def out_path(args: argparse.Namespace, name: str) -> Path:
    """Where a run's JSON goes: --out, else a fresh temporary file for --smoke, else
    benchmarks/results/NAME.json."""
    if args.out is not None:
        return args.out
    if args.smoke:
        fd, path = tempfile.mkstemp(prefix=f"saelab-bench-{name}-smoke-", suffix=".json")
        os.close(fd)
        return Path(path)
    return RESULTS / f"{name}.json"


def write_json(path: Path, result: dict[str, Any], indent: int = 1) -> None:
    """Write the result atomically: a reader (or a killed run) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=indent) + "\n")
    tmp.replace(path)
