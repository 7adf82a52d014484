"""Timers, memory probes and the optimizer of ``unipeft bench perf``: interleaved rounds
(:func:`time_interleaved`), one variant alone (:func:`time_steady`), and the fused AdamW
every training figure steps with (:func:`adamw`)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable
from itertools import pairwise
from statistics import mean, median
from typing import Any

import torch
from torch import Tensor, nn

GIB = 2**30
LR = 1e-5


# ============================================================================== optimizer


def adamw(params: Iterable[nn.Parameter], *, capturable: bool = False) -> torch.optim.Optimizer:
    """AdamW with ``fused=True``: the single-kernel implementation, what Hugging Face's
    ``Trainer`` picks on CUDA (``adamw_torch_fused``); PyTorch has it on the CPU too.
    ``capturable=True`` keeps the step count on the device, for CUDA-graph capture.
    Both libraries' variants step with it, full fine-tuning too."""
    return torch.optim.AdamW(list(params), lr=LR, fused=True, capturable=capturable)


def optimizer_record(device: str) -> dict[str, Any]:
    """What :func:`adamw` builds, for the result's config."""
    return {
        "class": "torch.optim.AdamW",
        "lr": LR,
        "fused": True,
        "on": device,
        "used_by": "every training figure of both libraries; the CUDA-graph section adds "
        "capturable=True",
    }


# ================================================================================= timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _run_once(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    """Seconds one call of ``fn`` takes (CUDA events on the GPU, perf_counter on the CPU),
    and seconds until the call returned to Python (on CUDA, before the synchronize: when
    that is as long as the device time, the host's launches set the pace)."""
    if device == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000, host
    t0 = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t0
    return elapsed, elapsed


def time_interleaved(
    variants: dict[str, Callable[[], Any]],
    *,
    device: str,
    warmup: int,
    repeats: int,
    host: dict[str, float] | None = None,
) -> dict[str, float]:
    """Median milliseconds per call of each variant. Every round calls each variant once,
    starting one variant later than the round before, so slow drift and ordering effects
    fall on every variant alike. ``host`` receives the median milliseconds until each call
    returned to Python."""
    names = list(variants)
    if not names:
        return {}
    for _ in range(warmup):
        for name in names:
            variants[name]()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    returned: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed, back = _run_once(variants[name], device)
            times[name].append(elapsed)
            returned[name].append(back)
    if host is not None:
        host.update({name: 1000 * median(ts) for name, ts in returned.items()})
    return {name: 1000 * median(ts) for name, ts in times.items()}


def _wall(fn: Callable[[], Any], device: str) -> float:
    """Seconds of ``fn`` by the wall clock, the device synchronized before and after."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer | None) -> int:
    """Bytes that stay allocated between steps: parameters, buffers, optimizer state."""
    seen: set[int] = set()
    total = 0
    tensors = [*model.parameters(), *model.buffers()]
    if opt is not None:
        tensors += [v for s in opt.state.values() for v in s.values() if isinstance(v, Tensor)]
    for t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _peak_bytes(fn: Callable[[], Any], resident: int) -> int:
    """Peak CUDA memory of one call of ``fn`` as if its model were alone on the device:
    the allocation peak above what was allocated before the call, plus ``resident``."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before + resident


def _gib(n: int | None) -> float | None:
    return None if n is None else n / GIB


def release(device: str) -> None:
    """Between variants timed one at a time: on CUDA, give the last one's memory back (a
    full collection, then the cache); on the CPU nothing, where a collection of the whole
    heap would cost more than the small models it frees."""
    if device == "cuda":
        _free(device)


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def time_steady(
    step: Callable[[], Any], *, device: str, warmup: int, steps: int
) -> dict[str, float]:
    """One variant alone, as a training loop runs it: ``warmup`` untimed calls, then
    ``steps`` calls back to back with no synchronisation between them. On CUDA an event is
    recorded before the first timed call and after each one, and the device synchronised
    once at the end, so a step's time is the distance between its events (host stalls
    included, as a loop sees them); on the CPU each call is timed with ``perf_counter``.
    Returns the median and the mean milliseconds per step, and the first warm-up call's
    milliseconds (wall clock, synchronised: with ``torch.compile`` that is the compile)."""
    first = None
    for i in range(warmup):
        if i == 0:
            first = 1000 * _wall(step, device)
        else:
            step()
    _sync(device)
    per: list[float] = []
    if device == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for i in range(steps):
            step()
            events[i + 1].record()
        torch.cuda.synchronize()
        per = [a.elapsed_time(b) for a, b in pairwise(events)]
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            per.append(1000 * (time.perf_counter() - t0))
    return {"median_ms": median(per), "mean_ms": mean(per), "first_call_ms": first}
