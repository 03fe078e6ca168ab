"""Shared benchmark contract: a Case per (op, shape), and a median timer.

Each bench/bench_<op>.py defines `cases(device: torch.device, quick: bool) -> list[Case]`;
bench/kernel_bench.py runs them.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Case:
    """One benchmark point: every implementation of `op` on the same inputs.

    fns maps an implementation name ("reference", "cpu", "cuda", "triton", or a baseline such
    as "sdpa") to a zero-argument callable; "reference" is required (speedups are relative to
    it). bytes_moved is the minimum number of bytes read plus written, for GB/s.
    """

    op: str
    shape: str
    fns: dict[str, Callable[[], object]]
    bytes_moved: int | None = None

    def __post_init__(self) -> None:
        if "reference" not in self.fns:
            raise ValueError(f"Case {self.op} [{self.shape}]: fns must include 'reference', got {list(self.fns)}")


def time_ms(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, iters: int = 20) -> float:
    """Median wall time of one fn() call in milliseconds.

    On CUDA each call is bracketed by events and the device synchronised, so asynchronous
    launches are timed to completion; on CPU time.perf_counter is used.
    """
    device = torch.device(device)
    if iters < 1:
        raise ValueError(f"iters: expected >= 1, got {iters}")
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)
