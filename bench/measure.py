"""Timing and peak-memory measurement for benchmarks, in one process.

Peak memory on the CPU is the peak resident set size above the level before the measured call, sampled every
millisecond from /proc/self/statm by a background thread (CUDA: torch's own peak counter).
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE


@dataclass
class Measurement:
    seconds: float  # median over repeats
    peak_bytes: int  # peak memory above the level before the call

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


class _PeakSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = rss_bytes()
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)


def measure(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> Measurement:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` calls, and its peak memory."""
    for _ in range(warmup):
        fn()
    gc.collect()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
        sampler = _PeakSampler()
        sampler.start()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        sampler.running = False
        sampler.join()
        peak = sampler.peak - base
    return Measurement(statistics.median(times), max(peak, 0))
