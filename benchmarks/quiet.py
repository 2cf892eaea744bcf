"""Whether the machine is quiet enough to measure, judged by what else uses its CPUs.

Taking contenders in turns protects a ratio from a load that hurts them equally, not from
one that hurts them unequally: on 2 shared cores the 50257-wide elementwise work of a
small model's head suffers more from a neighbour than the matmuls do, and a 1.4x became
a 2.1x. So a benchmark measures only on a quiet machine, and says how quiet it was:

- before it starts, `wait_until_quiet` samples the CPU time that processes outside this
  benchmark's own process tree use; while they hold more than QUIET_SHARE of the
  machine it waits, naming them, and gives up after `patience` seconds;
- while it runs, `Watch` measures the same share, and the result records it with the
  load average, so a table taken under load says so (docs/performance.md marks it).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

QUIET_SHARE = 0.05  # others' CPU time / (wall time x cores) above which a run is busy
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Busy(Exception):
    """The machine stayed busy for longer than the benchmark was willing to wait."""


def _stat(pid: str) -> tuple[int, float, str, int] | None:
    """(parent pid, CPU seconds used, command name, start time in ticks) of a process;
    None once it is gone. The start time tells a reused pid from the same process (a
    kernel worker's name changes with the work it does)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    # fields[1] is the parent pid; utime, stime and starttime are fields 14, 15 and 22 of
    # stat (1-based), fields[11], [12] and [19] here
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, name, int(fields[19])


def cpu_by_process() -> dict[int, tuple[int, float, str, int]]:
    processes = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found = _stat(entry)
            if found is not None:
                processes[int(entry)] = found
    return processes


def ours(processes: dict[int, tuple[int, float, str, int]], root: int) -> set[int]:
    """`root` and every process below it: the benchmark and what it started."""
    children: dict[int, list[int]] = {}
    for pid, (parent, *_) in processes.items():
        children.setdefault(parent, []).append(pid)
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo += children.get(pid, [])
    return tree


@dataclass
class Sample:
    """What processes outside the benchmark used of the machine over an interval."""

    seconds: float
    others_cpu_s: float
    share: float  # of wall time x cores
    top: list[tuple[str, float]]  # the busiest others: (name (pid), CPU seconds)
    load_average_1m: float

    @property
    def quiet(self) -> bool:
        return self.share <= QUIET_SHARE

    def describe(self) -> str:
        names = ", ".join(f"{name} {cpu:.1f} s" for name, cpu in self.top) or "nothing"
        return (
            f"other processes used {self.share:.0%} of the {os.cpu_count()} cores over "
            f"{self.seconds:.0f} s ({names}); load average {self.load_average_1m:.2f}"
        )

    def record(self) -> dict:
        return {
            "others_cpu_share": self.share,
            "others_cpu_s": self.others_cpu_s,
            "seconds": self.seconds,
            "busiest_others": self.top,
            "load_average_1m_at_end": self.load_average_1m,
            "quiet": self.quiet,
            "quiet_below": QUIET_SHARE,
        }


class Watch:
    """Measures the others' share of the machine from start() to stop()."""

    def __init__(self, root: int | None = None):
        self.root = root or os.getpid()

    def start(self) -> "Watch":
        self.began, self.before = time.monotonic(), cpu_by_process()
        return self

    def stop(self) -> Sample:
        after, seconds = cpu_by_process(), time.monotonic() - self.began
        mine = ours(after, self.root) | ours(self.before, self.root)
        used: dict[int, float] = {}
        for pid, (_, cpu, _, started) in after.items():
            if pid not in mine:
                earlier = self.before.get(pid)
                same = earlier is not None and earlier[3] == started
                used[pid] = cpu - (earlier[1] if same else 0)
        total = sum(max(0.0, v) for v in used.values())
        top = sorted(
            ((f"{after[p][2]} ({p})", v) for p, v in used.items() if v > 0.05),
            key=lambda item: -item[1],
        )[:3]
        share = total / max(seconds * (os.cpu_count() or 1), 1e-9)
        return Sample(seconds, total, share, top, os.getloadavg()[0])


def wait_until_quiet(patience: float, window: float = 5.0, say=print) -> Sample:
    """The first `window`-second sample in which the others are quiet; Busy when none
    is within `patience` seconds."""
    deadline = time.monotonic() + patience
    while True:
        watch = Watch().start()
        time.sleep(window)
        sample = watch.stop()
        if sample.quiet:
            return sample
        if time.monotonic() + window > deadline:
            raise Busy(sample.describe())
        say(f"waiting for a quiet machine: {sample.describe()}")
