"""The survey's rank sweep: LoRA ranks on the demo's text task, accuracy vs parameters.

It reuses the demo's task (all-MiniLM-L6-v2 on the VADER lexicon's polarity, seeded split)
and LoRA's recipe there, fixing the rank instead of planning it from a budget; every row
trains through :class:`unipeft.training.Trainer`, as the demo's rows do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64)


def rank_sweep(
    ranks: Sequence[int] = DEFAULT_RANKS,
    *,
    seed: int = 0,
    quick: bool = False,
    device: str = "cpu",
    progress: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """One row per rank: trainable fraction, accuracy, training time and peak memory."""
    from ..demo.runner import run_recipes
    from ..demo.text import build_task, recipes
    from ..demo.train import set_determinism

    set_determinism(seed, threads=torch.get_num_threads())
    base = next(r for r in recipes(quick) if r.method == "lora")
    chosen = [
        dataclasses.replace(
            base, name=f"lora r={r}", config={**base.config, "r": r, "alpha": 2.0 * r}
        )
        for r in ranks
    ]
    task = build_task(seed, quick)
    rows = run_recipes(task, chosen, seed, torch.device(device), 1.0, progress)
    return [{**row.as_dict(), "rank": r} for row, r in zip(rows, ranks, strict=True)]
