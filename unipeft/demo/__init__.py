"""The unipeft demo: PEFT methods of every family against full fine-tuning and a linear
probe, on a real pretrained text model and on two vision towers pretrained for transfer.

``python -m unipeft.demo --output DIR`` (or ``unipeft demo --output DIR``) runs it:

* text: the pretrained all-MiniLM-L6-v2 on the polarity of the human-rated VADER
  lexicon entries (``|mean| >= 0.5``), mean pooling and a linear head;
* vision: a small timm ViT and a small open_clip image tower, each pretrained here on
  scikit-learn digits 0-4, then adapted to the held-out digits 5-9.

Each method gets a matched trainable budget through :func:`unipeft.plan_budget`. The
demo writes ``DIR/results.json`` and ``DIR/accuracy_vs_trainable.png`` and prints the table.
See docs/demo.md.
"""

from __future__ import annotations

import multiprocessing
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from .report import DemoError, OutputError, check_output, print_table, write_plot, write_results
from .train import ROW_KEYS, Row, set_determinism

__all__ = [
    "ROW_KEYS",
    "TEXT_BUDGET",
    "VISION_BUDGET",
    "DemoError",
    "OutputError",
    "Row",
    "run_demo",
]

TEXT_BUDGET = 0.01
"""Trainable budget of the budget-sized methods on the text task (of MiniLM's 22.7M)."""
VISION_BUDGET = 0.02
"""Trainable budget on the vision tasks: their towers are small (about 0.2M parameters),
and the smallest UniPELT and MoE-LoRA configurations there need more than 1%."""
Part = tuple[str, tuple[str, ...] | None]
"""A task (``text`` / ``vision``) and the recipes of it to run (None: all)."""
_TEXT_MAIN = ("full fine-tuning", "linear probe", "lora", "bottleneck_adapter", "prompt_tuning")
WORKERS: tuple[tuple[Part, ...], ...] = (
    (("text", (*_TEXT_MAIN, "bitfit")),),
    (("vision", None), ("text", ("unipelt", "moe_lora"))),
)
"""What each of the two CPU processes runs: about the same time on each. A row depends
only on the seed, never on which process ran it or what ran before."""


def _run_parts(
    parts: Sequence[Part], seed: int, quick: bool, device: str, start: float
) -> list[Row]:
    """Some parts of the demo, in this process, single-threaded on CPU."""
    from . import text, vision

    set_determinism(seed, threads=1)
    dev = torch.device(device)

    def progress(line: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {line}", flush=True)

    rows: list[Row] = []
    with warnings.catch_warnings():  # library deprecation chatter, not the demo's business
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        for task, only in parts:
            if task == "text":
                rows += text.run(seed, quick, dev, TEXT_BUDGET, progress, only=only)
            else:
                rows += vision.run(seed, quick, dev, VISION_BUDGET, progress, only=only)
    return rows


def _order(rows: Sequence[Row]) -> list[Row]:
    """Rows by task (text first, then each vision tower) and by recipe, whichever process
    produced them."""
    from . import text, vision

    tasks = [text.TASK, *(name for name, _ in vision.BACKBONES.values())]
    methods = [r.name for r in text.recipes(quick=False)]
    return sorted(rows, key=lambda r: (tasks.index(r.task), methods.index(r.method)))


def run_demo(
    output: str | Path,
    *,
    seed: int = 0,
    quick: bool = False,
    device: str = "cpu",
    jobs: int | None = None,
    show: bool = True,
) -> list[Row]:
    """Run the demo and write its results into ``output``; return the rows.

    The device and the output folder are checked first (:class:`DemoError`,
    :class:`OutputError` if the folder cannot be written), before any training. On CPU
    the work is split over two processes (``jobs=1``: this process), each with one thread,
    so the same ``seed`` gives the same accuracies; ``quick`` is a CI-sized run.
    ``device="cuda"`` runs everything in this process on the GPU.
    """
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise DemoError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if device != "cpu" and not torch.cuda.is_available():
        raise DemoError(f"device {device!r} was asked for, but CUDA is not available here")
    directory = check_output(output)
    jobs = jobs if jobs is not None else (len(WORKERS) if device == "cpu" else 1)
    start = time.perf_counter()
    if jobs <= 1:
        threads = torch.get_num_threads()
        deterministic = torch.are_deterministic_algorithms_enabled()
        try:
            parts = [p for worker in WORKERS for p in worker]
            rows = _run_parts(parts, seed, quick, device, start)
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=len(WORKERS), mp_context=ctx) as pool:
            futures = [pool.submit(_run_parts, w, seed, quick, device, start) for w in WORKERS]
            rows = [row for f in futures for row in f.result()]
    rows = _order(rows)
    elapsed = time.perf_counter() - start
    write_plot(directory, rows)
    write_results(directory, rows)
    if show:
        mode = "quick" if quick else "full"
        print_table(rows, f"unipeft demo ({mode}, seed {seed}, {device}): {elapsed:.0f}s")
        print(f"wrote {directory / 'results.json'} and {directory / 'accuracy_vs_trainable.png'}")
    return rows
