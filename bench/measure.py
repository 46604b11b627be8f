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
from pathlib import Path

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


def matmul_peaks(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a size x size matrix product (best of ``repeats``) through ``a @ b`` (MKL for float32) and through
    oneDNN directly, where torch has it. The machine's peak is the larger: on the AMD EPYC of issue 14 MKL's float32
    sgemm ran at less than half of oneDNN's (116 vs 256 GFLOP/s, one thread)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    calls = {"matmul": lambda: a @ b}
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        b_t = b.t().contiguous()
        calls["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], "")
    with torch.inference_mode():
        return {name: 2 * size**3 / best_time(call, repeats) / 1e9 for name, call in calls.items()}


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``fn``, in seconds, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def print_table(header: list[str], rows: list[list[str]], markdown: bool, width: int = 14) -> None:
    """Rows as a markdown table, or as right-aligned columns of ``width`` characters."""
    if markdown:
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        for row in [header, *rows]:
            print("  ".join(f"{c:>{width}s}" for c in row))


def matmul_peak(dtype: torch.dtype = torch.float32, size: int = 2048) -> float:
    """The larger of ``matmul_peaks``: the machine's measured matrix-product peak in GFLOP/s."""
    return max(matmul_peaks(dtype, size).values())


def write_section(path: Path, name: str, text: str, title: str = "") -> None:
    """Replace (or append) the block between ``<!-- name -->`` and ``<!-- /name -->`` in ``path``, keeping the rest
    of the file; a new file starts with ``title``. Every bench that writes into a shared document goes through here."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else title
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
