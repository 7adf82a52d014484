"""Run a list of recipes on one task: build, apply the method at a budget, train, score."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import unipeft

from .models import Classifier, count_parameters
from .train import Batch, PeakMemory, Recipe, Row, accuracy, fit, timed


@dataclass(frozen=True)
class Task:
    """A classification task: fresh models and its data as batches."""

    name: str
    make: Callable[[], Classifier]
    """A fresh classifier: the pretrained backbone (a copy) and a new head."""
    train_batches: Callable[[torch.Generator], Sequence[Batch]]
    """One epoch of shuffled training batches."""
    test_batches: Sequence[Batch]
    probe_batches: Sequence[Batch]
    """The training set in evaluation order, for the linear probe's cached features."""


def plan(clf: Classifier, recipe: Recipe, budget: float) -> unipeft.BudgetPlan:
    """The recipe's configuration at ``budget`` (fixed-size methods: their own size)."""
    assert recipe.method is not None
    spec = unipeft.get_method(recipe.method)
    sized = spec.budget_field is not None and spec.budget_field not in recipe.config
    return unipeft.plan_budget(
        clf.backbone,
        recipe.method,
        budget if sized else 1.0,
        targets=recipe.targets,
        **recipe.config,
    )


def prepare(clf: Classifier, recipe: Recipe, budget: float) -> unipeft.DeltaModel | None:
    """Set what trains: everything (full), the head (probe), or a unipeft method + head."""
    if recipe.family == "full":
        clf.requires_grad_(True)
        return None
    if recipe.family == "probe":
        clf.backbone.requires_grad_(False)
        return None
    p = plan(clf, recipe, budget)
    model = unipeft.apply(clf.backbone, p.method, targets=p.targets, **p.config)
    clf.wrap(model)
    return model


def _train_probe(
    clf: Classifier, task: Task, recipe: Recipe, seed: int, device: torch.device
) -> None:
    """A linear probe on features computed once with the frozen backbone."""
    clf.eval()
    feats, labels = [], []
    with torch.no_grad():
        for inputs, y in task.probe_batches:
            feats.append(clf.features(**{k: v.to(device) for k, v in inputs.items()}))
            labels.append(y)
    x, y = torch.cat(feats), torch.cat(labels)

    def batches(gen: torch.Generator) -> list[Batch]:
        order = torch.randperm(len(y), generator=gen)
        return [({"input": x[i]}, y[i]) for i in order.split(64)]

    fit(
        clf.head,
        batches,
        head=clf.head,
        lr=recipe.lr,
        head_lr=recipe.head_lr,
        epochs=recipe.epochs,
        seed=seed,
        device=device,
    )


def run_recipe(task: Task, recipe: Recipe, seed: int, device: torch.device, budget: float) -> Row:
    """Train and score one recipe from a fresh model; the same seed gives the same row."""
    torch.manual_seed(seed)
    clf = task.make()
    total = count_parameters(clf)
    model = prepare(clf, recipe, budget)
    clf.to(device)
    trainable = count_parameters(clf, trainable_only=True)
    with PeakMemory(device) as memory, timed() as seconds:
        if recipe.family == "probe":
            _train_probe(clf, task, recipe, seed, device)
        else:
            fit(
                clf,
                task.train_batches,
                head=clf.head,
                lr=recipe.lr,
                head_lr=recipe.head_lr,
                epochs=recipe.epochs,
                seed=seed,
                device=device,
                aux_loss=model.aux_loss if model is not None else None,
            )
    return Row(
        task=task.name,
        method=recipe.name,
        family=recipe.family,
        trainable_fraction=trainable / total,
        accuracy=accuracy(clf, task.test_batches, device),
        train_seconds=seconds[0],
        peak_memory_bytes=memory.bytes,
    )


def run_recipes(
    task: Task,
    recipes: Sequence[Recipe],
    seed: int,
    device: torch.device,
    budget: float,
    progress: Callable[[str], None],
) -> list[Row]:
    """Every recipe on ``task``, in order, reporting each finished row to ``progress``."""
    rows = []
    for recipe in recipes:
        row = run_recipe(task, recipe, seed, device, budget)
        progress(
            f"{task.name} | {row.method}: accuracy {row.accuracy:.4f}, "
            f"{100 * row.trainable_fraction:.3g}% trainable, {row.train_seconds:.1f}s"
        )
        rows.append(row)
    return rows
