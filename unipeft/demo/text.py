"""The text task: VADER word polarity with the pretrained all-MiniLM-L6-v2."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..training import TextClassifier
from .chosen import chosen
from .data import PolaritySplit, vader_polarity_split
from .models import load_minilm
from .runner import Task, run_recipes
from .train import Batch, Draw, Recipe, Row

TASK = "text: VADER polarity / all-MiniLM-L6-v2"
MAX_LENGTH = 16
BATCH = 64


def encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids (with [CLS] and [SEP]) of each text, at most ``MAX_LENGTH`` long."""
    return tokenizer(list(texts), truncation=True, max_length=MAX_LENGTH)["input_ids"]


def collate(ids: Sequence[list[int]], labels: Sequence[int], pad: int) -> Batch:
    """Token ids padded with ``pad`` to the longest, their attention mask, and the labels."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}, torch.tensor(labels)


def bucketed(ids: Sequence[list[int]], batch_size: int) -> Draw:
    """Draw one epoch's batches: shuffled, then sorted by length within windows of 8
    batches (little padding, still random), in shuffled order."""
    n = len(ids)

    def draw(gen: torch.Generator) -> list[list[int]]:
        perm = torch.randperm(n, generator=gen).tolist()
        window = 8 * batch_size
        chunks = []
        for start in range(0, n, window):
            part = sorted(perm[start : start + window], key=lambda i: len(ids[i]))
            chunks += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
        return [chunks[i] for i in torch.randperm(len(chunks), generator=gen).tolist()]

    return draw


def eval_batches(
    ids: Sequence[list[int]], labels: Sequence[int], batch_size: int, pad: int
) -> list[Batch]:
    """Batches sorted by length, each padded to its own longest entry."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    chunks = [order[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    return [collate([ids[i] for i in c], [labels[i] for i in c], pad) for c in chunks]


ALL_PROJECTIONS = ["attn.q", "attn.k", "attn.v", "attn.out", "mlp.up", "mlp.down"]


VALIDATION_FRACTION = 0.1
"""The share of the training words held out to choose hyperparameters (``--select``)."""


def recipes(quick: bool) -> list[Recipe]:
    """The rows of the text task. Every method trains 2 epochs (``quick``: 1) at the
    learning rate that ``--select`` chose from its grid on seed 0's validation split
    (:data:`unipeft.demo.chosen.CHOSEN`)."""
    e = 1 if quick else 2
    return chosen(
        TASK,
        [
            Recipe("full fine-tuning", "full", lr=2e-4, head_lr=1e-3, epochs=e),
            Recipe("linear probe", "probe", lr=1e-2, epochs=20 if quick else 60),
            Recipe("lora", "reparameterized", "lora", targets=ALL_PROJECTIONS, lr=5e-3, epochs=e),
            Recipe("bottleneck_adapter", "additive", "bottleneck_adapter", lr=3e-3, epochs=e),
            Recipe(
                "prompt_tuning", "additive", "prompt_tuning", {"num_tokens": 8}, lr=3e-2, epochs=e
            ),
            Recipe("bitfit", "selective", "bitfit", lr=5e-3, epochs=e),
            Recipe("unipelt", "hybrid", "unipelt", {"prefix_tokens": 4}, lr=3e-3, epochs=e),
            Recipe("moe_lora", "moe", "moe_lora", lr=5e-3, epochs=e),
        ],
        quick,
    )


def build_task(seed: int, quick: bool) -> Task:
    """The VADER split, tokenised, and a factory of fresh MiniLM classifiers. Its
    ``validation`` task trains on the first 90% of the training words and scores on the
    last 10% (the training words are already in the seed's shuffled order)."""
    split: PolaritySplit = vader_polarity_split(seed)
    proto, tokenizer = load_minilm()
    pad = int(tokenizer.pad_token_id)
    train_x, train_y = encode(tokenizer, split.train_texts), split.train_labels
    test_x, test_y = encode(tokenizer, split.test_texts), split.test_labels
    if quick:
        train_x, train_y = train_x[:256], train_y[:256]
        test_x, test_y = test_x[:256], test_y[:256]
    n_fit = len(train_x) - round(VALIDATION_FRACTION * len(train_x))
    return _task(proto, pad, (train_x, train_y), (test_x, test_y), n_fit)


def _task(
    proto: Any,
    pad: int,
    train_set: tuple[list[list[int]], list[int]],
    test_set: tuple[list[list[int]], list[int]],
    n_fit: int | None,
) -> Task:
    train_x, train_y = train_set
    test_x, test_y = test_set

    def make() -> TextClassifier:
        return TextClassifier(copy.deepcopy(proto), int(proto.config.hidden_size), 2)

    def collate_examples(examples: list[tuple[list[int], int]]) -> Batch:
        return collate([x for x, _ in examples], [y for _, y in examples], pad)

    return Task(
        name=TASK,
        make=make,
        train_data=list(zip(train_x, train_y, strict=True)),
        collate=collate_examples,
        draw=bucketed(train_x, BATCH),
        test_batches=eval_batches(test_x, test_y, 256, pad),
        probe_batches=eval_batches(train_x, train_y, 256, pad),
        validation=None
        if n_fit is None
        else lambda: _task(
            proto,
            pad,
            (train_x[:n_fit], train_y[:n_fit]),
            (train_x[n_fit:], train_y[n_fit:]),
            None,
        ),
    )


def run(
    seed: int,
    quick: bool,
    device: torch.device,
    budget: float,
    progress: Callable[[str], None],
    only: Sequence[str] | None = None,
    select: bool = False,
) -> list[Row]:
    """Every text recipe (or those named in ``only``) at ``budget``; ``select``: choose
    each learning rate on the validation split first."""
    picked = [r for r in recipes(quick) if only is None or r.name in only]
    task = build_task(seed, quick)
    return run_recipes(task, picked, seed, device, budget, progress, select=select)
