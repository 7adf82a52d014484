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
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from .report import (
    PLOT,
    RESULTS,
    SUMMARY,
    DemoError,
    OutputError,
    check_output,
    print_table,
    write_plot,
    write_results,
    write_summary,
)
from .train import ROW_KEYS, Row, set_determinism

__all__ = [
    "ROW_KEYS",
    "TASKS",
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
"""A task (``text``, ``vision`` or one tower of it, ``vision:timm`` / ``vision:clip``, or
``clip``) and the recipes of it to run (None: all)."""
_TEXT_MAIN = ("full fine-tuning", "linear probe", "lora", "bottleneck_adapter", "prompt_tuning")
WORKERS: tuple[tuple[Part, ...], ...] = (
    (("text", (*_TEXT_MAIN, "bitfit")),),
    (("vision", None), ("clip", None), ("text", ("unipelt", "moe_lora"))),
)
TASKS = ("text", "vision", "clip")
"""What each of the two CPU processes runs: about the same time on each. A row depends
only on the seed, never on which process ran it or what ran before (with more processes,
``jobs > 2``, each row runs on its own: the same rows)."""


def _run_parts(
    parts: Sequence[Part],
    seed: int,
    quick: bool,
    device: str,
    start: float,
    select: bool = False,
) -> tuple[list[Row], list[str]]:
    """Some parts of the demo, in this process, single-threaded on CPU: the rows, and a
    line for each part that failed (the others still run)."""

    set_determinism(seed, threads=1)
    dev = torch.device(device)

    def progress(line: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {line}", flush=True)

    rows: list[Row] = []
    failures: list[str] = []
    with warnings.catch_warnings():  # library deprecation chatter, not the demo's business
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        for part in parts:
            try:
                rows += _run_part(part, seed, quick, dev, progress, select)
            except Exception as exc:  # the other parts still run; run_demo reports it
                task, only = part
                what = f"{task} {', '.join(only) if only else '(all rows)'} (seed {seed})"
                progress(f"FAILED: {what}: {type(exc).__name__}: {exc}")
                failures.append(f"{what}: {type(exc).__name__}: {exc}")
    return rows, failures


def _run_part(
    part: Part,
    seed: int,
    quick: bool,
    dev: torch.device,
    progress: Callable[[str], None],
    select: bool,
) -> list[Row]:
    """One part of the demo: some rows of one task."""
    from . import clip, text, vision

    task, only = part
    if task == "text":
        return text.run(seed, quick, dev, TEXT_BUDGET, progress, only, select)
    if task.startswith("vision"):
        kinds = tuple(vision.BACKBONES) if task == "vision" else (task.split(":")[1],)
        return vision.run(seed, quick, dev, VISION_BUDGET, progress, kinds, only, select)
    return clip.run(seed, quick, dev, VISION_BUDGET, progress, only, select)


def _workers(tasks: Sequence[str], fine: bool) -> list[tuple[Part, ...]]:
    """The parts of ``tasks``, grouped as :data:`WORKERS` does, or (``fine``, for more
    processes than two) one part per row, so that many cores share the work."""
    if not fine:
        chosen = [tuple(p for p in w if p[0] in tasks) for w in WORKERS]
        return [w for w in chosen if w]
    from . import clip, text, vision

    parts: list[tuple[Part, ...]] = []
    if "text" in tasks:
        parts += [(("text", (r.name,)),) for r in text.recipes(False)]
    if "clip" in tasks:
        parts += [(("clip", (r.name,)),) for r in clip.recipes(False)]
    if "vision" in tasks:
        parts += [
            ((f"vision:{kind}", (r.name,)),)
            for kind in vision.BACKBONES
            for r in vision.recipes(False, kind)
        ]
    return parts


def _order(rows: Sequence[Row]) -> list[Row]:
    """Rows by seed, task (text first, then each vision tower, then CLIP) and recipe (in
    the task's own order), whichever process produced them."""
    from . import clip, text, vision

    order = {text.TASK: [r.name for r in text.recipes(False)]}
    for kind, (name, _) in vision.BACKBONES.items():
        order[name] = [r.name for r in vision.recipes(False, kind)]
    order[clip.TASK] = [r.name for r in clip.recipes(False)]
    tasks = list(order)
    return sorted(rows, key=lambda r: (r.seed, tasks.index(r.task), order[r.task].index(r.method)))


def run_demo(
    output: str | Path,
    *,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    quick: bool = False,
    device: str = "cpu",
    jobs: int | None = None,
    show: bool = True,
    select: bool = False,
    tasks: Sequence[str] = TASKS,
) -> list[Row]:
    """Run the demo and write its results into ``output``; return the rows.

    The device and the output folder are checked first (:class:`DemoError`,
    :class:`OutputError` if the folder cannot be written), before any training. On CPU
    the work is split over two processes (``jobs=1``: this process), each with one thread,
    so the same ``seed`` gives the same accuracies; ``quick`` is a CI-sized run.
    ``device="cuda"`` runs everything in this process on the GPU. ``seeds`` (default:
    ``[seed]``) runs every row once per seed; ``summary.json`` and the table then give each
    row's mean and spread over the seeds. ``select`` chooses every learning rate on a
    validation split first (see :mod:`unipeft.demo.chosen`); ``tasks`` picks some of
    ``text``, ``vision``, ``clip``.
    """
    seeds = list(seeds) if seeds is not None else [seed]
    if not seeds or len(set(seeds)) != len(seeds):
        raise DemoError(f"seeds must be distinct and not empty, got {seeds}")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise DemoError(f"tasks must be some of {list(TASKS)}, got {list(tasks)}")
    jobs = jobs if jobs is not None else (len(WORKERS) if device == "cpu" else 1)
    workers = _workers(tasks, fine=jobs > len(WORKERS))
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise DemoError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if device != "cpu" and not torch.cuda.is_available():
        raise DemoError(f"device {device!r} was asked for, but CUDA is not available here")
    directory = check_output(output)
    start = time.perf_counter()
    if jobs <= 1:
        threads = torch.get_num_threads()
        deterministic = torch.are_deterministic_algorithms_enabled()
        try:
            parts = [p for worker in workers for p in worker]
            done = [_run_parts(parts, s, quick, device, start, select) for s in seeds]
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = [
                pool.submit(_run_parts, w, s, quick, device, start, select)
                for s in seeds
                for w in workers
            ]
            done = [f.result() for f in futures]
    rows = _order([row for got, _ in done for row in got])
    failures = [line for _, failed in done for line in failed]
    elapsed = time.perf_counter() - start
    write_plot(directory, rows)
    write_results(directory, rows)
    write_summary(directory, rows)
    if show:
        mode = ("quick" if quick else "full") + (", selected on validation" if select else "")
        seeds_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {','.join(map(str, seeds))}"
        print_table(rows, f"unipeft demo ({mode}, {seeds_text}, {device}): {elapsed:.0f}s")
        print(f"wrote {RESULTS}, {SUMMARY} and {PLOT} into {directory}")
    if failures:
        raise DemoError(
            f"{len(failures)} part(s) of the demo failed (the other rows are written): "
            + "; ".join(failures)
        )
    return rows
