"""Peak memory of a block of work: CUDA's allocator statistics, or the process's resident
set size on CPU (docs/training.md, "Time and memory")."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import resource
import sys
from typing import Any

import torch


def _proc_status(field: str) -> int | None:
    """A size from ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _rss_bytes() -> int:
    """The resident set size now."""
    now = _proc_status("VmRSS")
    return now if now is not None else _maxrss_bytes()


def _peak_rss_bytes() -> int:
    """The peak resident set size since the last reset: the kernel's ``VmHWM`` (what
    ``resource.getrusage`` reports as max RSS; that call is the fallback off Linux)."""
    peak = _proc_status("VmHWM")
    return peak if peak is not None else _maxrss_bytes()


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so
    the resident size at the start of a block counts live memory only."""
    gc.collect()
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory(device) as m:`` ... then ``m.bytes``: the block's peak memory.

    On CUDA: ``torch.cuda.max_memory_allocated`` (its statistics reset first). On CPU: how
    far the process's resident set size rose above its size at the start. Before the block,
    freed heap pages go back to the OS (glibc ``malloc_trim``) and the kernel's high-water
    mark is reset (``/proc/self/clear_refs``); after it, the peak is read from ``VmHWM`` in
    ``/proc/self/status`` (``resource.getrusage`` max RSS off Linux, where the mark cannot
    be reset and the growth reads 0 once an earlier block peaked higher). The CPU figure
    counts everything the process holds, the allocator's cache included.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.bytes = 0
        self._start = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _release_free_memory()
            _reset_peak_rss()
            self._start = _rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.bytes = max(0, _peak_rss_bytes() - self._start)
