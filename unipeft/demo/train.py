"""Training, evaluation and measurement shared by the demo's tasks."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

Batch = tuple[dict[str, Tensor], Tensor]
"""Model inputs (keyword arguments) and labels."""

ROW_KEYS = (
    "task",
    "method",
    "family",
    "trainable_fraction",
    "accuracy",
    "train_seconds",
    "peak_memory_bytes",
)


@dataclass(frozen=True)
class Row:
    """One line of the results table (the keys of ``results.json``)."""

    task: str
    method: str
    family: str
    trainable_fraction: float
    accuracy: float
    train_seconds: float
    peak_memory_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Recipe:
    """How one row is trained: a unipeft method (or ``full`` / ``probe``) and its schedule.

    ``config`` holds fixed method fields; the method's size field is chosen by
    :func:`unipeft.plan_budget` for the task's budget unless ``config`` already fixes it.
    """

    name: str
    family: str
    method: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    targets: list[str] | None = None
    lr: float = 1e-3
    epochs: int = 1
    head_lr: float | None = None
    """Learning rate of the head (default: ``lr``)."""


def set_determinism(seed: int, threads: int) -> None:
    """Seed every RNG, fix the thread count and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False


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


def _rss_bytes() -> int:
    """The resident set size now."""
    now = _proc_status("VmRSS")
    return now if now is not None else _maxrss_bytes()


def _peak_rss_bytes() -> int:
    """The peak resident set size since the last reset: the kernel's ``VmHWM`` (what
    ``resource.getrusage`` reports as max RSS; that call is the fallback off Linux)."""
    peak = _proc_status("VmHWM")
    return peak if peak is not None else _maxrss_bytes()


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so
    the resident size at the start of a run counts live memory only."""
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
    """Peak memory of a block. On CUDA: ``torch.cuda.max_memory_allocated`` (reset first).
    On CPU: how far the process's peak resident set size rose above its size at the start.
    Before the block, freed heap pages go back to the OS (glibc ``malloc_trim``) and the
    kernel's high-water mark is reset (``/proc/self/clear_refs``); after it, the peak is
    read from ``VmHWM`` in ``/proc/self/status`` (``resource.getrusage`` max RSS off
    Linux, where the mark cannot be reset and the growth reads 0 once an earlier block
    peaked higher)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes = 0

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


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def fit(
    model: nn.Module,
    batches: Callable[[torch.Generator], Sequence[Batch]],
    *,
    head: nn.Module,
    lr: float,
    head_lr: float | None,
    epochs: int,
    seed: int,
    device: torch.device,
    aux_loss: Callable[[], Tensor | None] | None = None,
    weight_decay: float = 0.01,
    warmup: float = 0.06,
) -> None:
    """AdamW on the trainable parameters, linear warm-up then linear decay; cross-entropy
    plus ``aux_loss()`` (e.g. MoE load balancing) where it returns a tensor."""
    head_ids = {id(p) for p in head.parameters()}
    body = [p for p in trainable_parameters(model) if id(p) not in head_ids]
    groups: list[dict[str, Any]] = [{"params": list(head.parameters()), "lr": head_lr or lr}]
    if body:
        groups.append({"params": body, "lr": lr})
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    first = batches(gen)  # every epoch has as many batches; later ones are drawn when due
    total = epochs * len(first)
    warm = max(1, int(warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))
    )
    model.train()
    for epoch in range(epochs):
        for inputs, labels in first if epoch == 0 else batches(gen):
            inputs = {k: v.to(device) for k, v in inputs.items()}
            logits = model(**inputs)
            loss = nn.functional.cross_entropy(logits, labels.to(device))
            extra = aux_loss() if aux_loss is not None else None
            if extra is not None:
                loss = loss + extra
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, batches: Sequence[Batch], device: torch.device) -> float:
    """The fraction of correct argmax predictions over ``batches``."""
    model.eval()
    correct = seen = 0
    for inputs, labels in batches:
        logits = model(**{k: v.to(device) for k, v in inputs.items()})
        correct += int((logits.argmax(-1).cpu() == labels).sum())
        seen += len(labels)
    return correct / max(1, seen)


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t:`` ... ``t[0]`` holds the seconds the block took."""
    box = [0.0]
    start = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - start
