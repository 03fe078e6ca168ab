"""CPU threads per decode step: all of the caller's while the machine is otherwise idle, the
cores left over while other processes keep some busy.

A decode step on the CPU is hundreds of small parallel regions (the skinny linears, the
attention of every layer), and OpenMP threads wait for each other at the end of each. When
another process holds a core, one of our threads is descheduled in most regions and its peers
wait out its time slice: beside one competing process on 2 cores, eagle2 ran at 0.5-0.6x of
plain decoding. Before each step the governor counts the runnable tasks that are not ours
(/proc/loadavg minus this process's running threads), takes the median of the last few counts,
and runs the step on the cores left, at least one and at most the caller's
torch.get_num_threads(), which it restores when decoding ends. Where /proc is missing (not
Linux), or the process may run on only some of the machine's cores (a cpuset: the count is the
whole machine's), it changes nothing.
"""
from __future__ import annotations

import collections
import os

import torch

_SAMPLES = 5  # steps whose counts the median covers: a short job beside us moves nothing at once


def other_runnable() -> int | None:
    """Runnable tasks on the machine that are not threads of this process, or None without
    /proc (the count in /proc/loadavg includes ours, whether running or spinning)."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        ours = 0
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    stat = f.read()
            except OSError:  # the thread ended meanwhile
                continue
            ours += stat[stat.rindex(")") + 2] == "R"
    except (OSError, ValueError, IndexError):
        return None
    return max(running - ours, 0)


def threads_for(counts: list[int], cores: int, limit: int) -> int:
    """The cores that the median of the recent runnable counts leaves, in [1, limit]."""
    busy = sorted(counts)[len(counts) // 2] if counts else 0
    return max(1, min(limit, cores - busy))


class ThreadGovernor:
    """Use as a context around a decode loop on the CPU and call `step()` before each step."""

    def __init__(self, device: torch.device):
        self.limit = torch.get_num_threads()
        self.cores = os.cpu_count() or 1
        # The runnable count is the whole machine's: it says nothing about a subset of its cores.
        whole_machine = not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) == self.cores
        self.active = (device.type == "cpu" and self.limit > 1 and whole_machine and other_runnable() is not None
                       and os.environ.get("EAGLE2_ADAPTIVE_THREADS") != "0")
        self.counts: collections.deque[int] = collections.deque(maxlen=_SAMPLES)

    def __enter__(self) -> ThreadGovernor:
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            torch.set_num_threads(self.limit)

    def step(self) -> int:
        """Set and return the thread count for the next step."""
        if not self.active:
            return self.limit
        count = other_runnable()
        if count is not None:
            self.counts.append(count)
        threads = threads_for(list(self.counts), self.cores, self.limit)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads
