"""Run a list of recipes on one task: build, apply the method at a budget, train, score."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

import unipeft

from ..training import PeakMemory
from .models import Classifier, count_parameters
from .train import Batch, Draw, Recipe, Row, TensorExamples, accuracy, fetched, shuffled, train

PROBE_BATCH = 64


@dataclass(frozen=True)
class Task:
    """A classification task: fresh models, its training examples and test batches."""

    name: str
    make: Callable[[], Classifier]
    """A fresh classifier: the pretrained encoder (a copy) and a new head."""
    train_data: Any
    """The training examples: a map-style dataset (a list, a torch ``Dataset``)."""
    collate: Callable[[Any], Batch]
    """Examples fetched from ``train_data`` -> one batch."""
    draw: Draw
    """One epoch of shuffled training batches, as example indices."""
    test_batches: Sequence[Batch]
    probe_batches: Sequence[Batch]
    """The training set in evaluation order, for the linear probe's cached features."""
    validation: Callable[[], Task] | None = None
    """The same task on a validation split carved from the training set (trained on the
    rest of it, scored on the carved part), for choosing hyperparameters; never the test
    split."""


def plan(clf: Classifier, recipe: Recipe, budget: float) -> unipeft.BudgetPlan:
    """The recipe's configuration at ``budget`` (fixed-size methods: their own size)."""
    assert recipe.method is not None
    spec = unipeft.get_method(recipe.method)
    sized = spec.budget_field is not None and spec.budget_field not in recipe.config
    return unipeft.plan_budget(
        clf.encoder,
        recipe.method,
        budget if sized else 1.0,
        targets=recipe.targets,
        **recipe.config,
    )


def prepare(clf: Classifier, recipe: Recipe, budget: float) -> dict[str, Any]:
    """Set what trains: everything (full), the head (probe), or a unipeft method + head;
    return the method's configuration (with its budget-sized field)."""
    if recipe.family == "full":
        clf.requires_grad_(True)
        return {}
    if recipe.family == "probe":
        clf.encoder.requires_grad_(False)
        return {}
    p = plan(clf, recipe, budget)
    clf.encoder = unipeft.apply(clf.encoder, p.method, targets=p.targets, **p.config)
    return dict(p.config)


def _train_probe(
    clf: Classifier, task: Task, recipe: Recipe, seed: int, device: torch.device
) -> None:
    """A linear probe: the head alone, on features computed once with the frozen encoder."""
    clf.eval()
    feats, labels = [], []
    with torch.no_grad():
        for inputs, y in task.probe_batches:
            feats.append(clf.features(**{k: v.to(device) for k, v in inputs.items()}))
            labels.append(y)
    x, y = torch.cat(feats), torch.cat(labels)
    train(
        clf.head,
        TensorExamples("input", x, y),
        shuffled(len(y), PROBE_BATCH),
        fetched,
        lr=recipe.head_lr or recipe.lr,
        head_lr=None,
        epochs=recipe.epochs,
        seed=seed,
        device=device,
        measure_memory=False,
    )


def run_recipe(task: Task, recipe: Recipe, seed: int, device: torch.device, budget: float) -> Row:
    """Train and score one recipe from a fresh model; the same seed gives the same row.

    Training time and peak memory are the trainer's measurements; the probe's are taken
    around its feature pass and its training together."""
    torch.manual_seed(seed)
    clf = task.make()
    total = count_parameters(clf)
    config = prepare(clf, recipe, budget)
    clf.to(device)
    trainable = count_parameters(clf, trainable_only=True)
    if recipe.family == "probe":
        with PeakMemory(device) as memory:
            began = time.perf_counter()
            _train_probe(clf, task, recipe, seed, device)
            seconds = time.perf_counter() - began
        peak = memory.bytes
    else:
        result = train(
            clf,
            task.train_data,
            task.draw,
            task.collate,
            lr=recipe.lr,
            head_lr=recipe.head_lr,
            epochs=recipe.epochs,
            seed=seed,
            device=device,
        )
        assert result.peak_memory_bytes is not None
        seconds, peak = result.seconds, result.peak_memory_bytes
    return Row(
        task=task.name,
        method=recipe.name,
        family=recipe.family,
        trainable_fraction=trainable / total,
        accuracy=accuracy(clf, task.test_batches, device),
        train_seconds=seconds,
        peak_memory_bytes=peak,
        seed=seed,
        hyperparameters=recipe.hyperparameters(config or None),
    )


def select_lr(recipe: Recipe, score: Callable[[Recipe], float]) -> tuple[Recipe, dict[str, float]]:
    """The recipe at the learning rate of ``recipe.grid`` with the best validation score
    (``score``; the first of equals), and every score by learning rate. A recipe without a
    grid is returned as it is."""
    if not recipe.grid:
        return recipe, {}
    scores = {lr: score(recipe.with_lr(lr)) for lr in recipe.grid}
    best = max(recipe.grid, key=lambda lr: scores[lr])  # max keeps the first of equals
    return recipe.with_lr(best), {f"lr={lr:g}": acc for lr, acc in scores.items()}


def run_recipes(
    task: Task,
    recipes: Sequence[Recipe],
    seed: int,
    device: torch.device,
    budget: float,
    progress: Callable[[str], None],
    select: bool = False,
) -> list[Row]:
    """Every recipe on ``task``, in order, reporting each finished row to ``progress``.

    ``select``: first choose each recipe's learning rate from its grid on the task's
    validation split (:func:`select_lr`), then train on the whole training set with it."""
    rows = []
    held_out = task.validation() if select and task.validation is not None else None
    for recipe in recipes:
        scores: dict[str, float] = {}
        if held_out is not None:

            def score(r: Recipe, val: Task = held_out) -> float:
                return run_recipe(val, r, seed, device, budget).accuracy

            recipe, scores = select_lr(recipe, score)
            if scores:
                progress(f"{task.name} | {recipe.name}: validation {_show(scores)}")
        row = replace(run_recipe(task, recipe, seed, device, budget), validation=scores)
        progress(
            f"{task.name} | {row.method}: accuracy {row.accuracy:.4f}, "
            f"{100 * row.trainable_fraction:.3g}% trainable, {row.train_seconds:.1f}s, "
            f"lr {recipe.lr:g}"
        )
        rows.append(row)
    return rows


def _show(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
