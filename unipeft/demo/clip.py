"""The CLIP task: base-to-novel generalisation of a small open_clip CLIP (both towers).

The CLIP is pretrained here, contrastively, on clean captioned digits of every class
(:mod:`unipeft.demo.clipmodel`); it is then adapted few-shot (16 shots per class) on the
base classes 0-4 of a shifted domain (rotated and tinted digits,
:func:`unipeft.demo.data.shift_domain`) and scored on that domain's test images of the base
classes and, separately, of the novel classes 5-9, each as a 5-way problem among its own
class names, as in CoOp / CoCoOp. A row's ``accuracy`` is the harmonic mean
``HM = 2 B N / (B + N)`` of the base (``B``) and novel (``N``) accuracies.

Rows: zero-shot (nothing trains), a linear probe (on frozen image features; its weights
start from the base classes' text embeddings, and the novel classes, which it never saw, are
scored with their text embeddings, i.e. zero-shot), full fine-tuning (both towers), and
unipeft methods: ``lora`` on both towers' attention, ``coop``, ``cocoop``, ``maple`` and
``clip_adapter``. Every classifier is :func:`unipeft.clip.zero_shot_head` over the model.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

import unipeft

from ..training import PeakMemory
from .chosen import chosen
from .clipmodel import TEMPLATES, WordTokenizer, default_tokenizer, pretrain_clip, small_clip
from .data import DIGIT_NAMES, BaseToNovelSplit, digits_base_to_novel_split
from .models import count_parameters
from .runner import select_lr
from .train import Batch, Recipe, Row, TensorExamples, accuracy, fetched, shuffled, train

__all__ = ["TASK", "ClipTask", "build_task", "harmonic_mean", "recipes", "run", "run_recipe"]

TASK = "clip: digits base-to-novel / open_clip CLIP"
BATCH = 32
PROBE_EPOCHS = 100


def harmonic_mean(base: float, novel: float) -> float:
    """``2 B N / (B + N)`` (0 when both are 0)."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def recipes(quick: bool) -> list[Recipe]:
    """The rows of the CLIP task, at the learning rates ``--select`` chose on seed 0's
    held-out base shots (:data:`unipeft.demo.chosen.CHOSEN`); ``quick`` trains fewer epochs."""
    e = 10 if quick else 40
    return chosen(
        TASK,
        [
            Recipe("zero-shot", "zero-shot", epochs=0),
            Recipe("linear probe", "probe", lr=1e-2, epochs=PROBE_EPOCHS // (4 if quick else 1)),
            Recipe("full fine-tuning", "full", lr=1e-4, epochs=e),
            Recipe(
                "lora", "reparameterized", "lora", targets=["attn.q", "attn.v"], lr=2e-3, epochs=e
            ),
            Recipe("coop", "additive", "coop", {"n_ctx": 4}, lr=5e-3, epochs=e),
            Recipe("cocoop", "additive", "cocoop", {"n_ctx": 4}, lr=5e-3, epochs=e),
            Recipe("maple", "additive", "maple", {"n_ctx": 2}, lr=2e-3, epochs=e),
            Recipe("clip_adapter", "additive", "clip_adapter", {}, lr=2e-3, epochs=e),
        ],
        quick,
    )


@dataclass(frozen=True)
class ClipTask:
    """The data, the tokenizer and the pretrained CLIP (kept on the CPU, copied per row)."""

    data: BaseToNovelSplit
    tokenizer: WordTokenizer
    proto: nn.Module
    pretrain_accuracy: float
    """10-way zero-shot accuracy of the pretrained CLIP on clean held-out images."""

    @property
    def base_names(self) -> list[str]:
        return [DIGIT_NAMES[c] for c in self.data.base]

    @property
    def novel_names(self) -> list[str]:
        return [DIGIT_NAMES[c] for c in self.data.novel]


class HeadClassifier(nn.Module):
    """A :func:`unipeft.clip.zero_shot_head` as the demo trainer's classifier:
    ``forward(pixels)`` returns the head's logits; ``aux_loss`` is the model's, if any."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, pixels: Tensor) -> Tensor:
        return self.head(pixels)

    def aux_loss(self) -> Tensor | None:
        aux = getattr(self.head.model, "aux_loss", None)
        return aux() if callable(aux) else None


class LinearProbe(nn.Module):
    """``logit_scale * features @ W.T`` on normalised frozen image features, ``W`` starting
    from the classes' normalised text embeddings (the zero-shot classifier)."""

    def __init__(self, text_features: Tensor, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(text_features.detach().clone())
        self.scale = scale

    def forward(self, features: Tensor) -> Tensor:
        return self.scale * features @ self.weight.T


def head(model: nn.Module, task: ClipTask, names: Sequence[str]) -> nn.Module:
    """CLIP's zero-shot classifier over ``names`` with the task's templates and tokenizer."""
    from ..clip import zero_shot_head

    return zero_shot_head(model, list(names), templates=TEMPLATES, tokenizer=task.tokenizer)


def _batches(x: Tensor, y: Tensor) -> list[Batch]:
    return [({"pixels": x[i]}, y[i]) for i in torch.arange(len(y)).split(256)]


def build_task(
    seed: int, quick: bool, device: torch.device, progress: Callable[[str], None]
) -> ClipTask:
    """The seed's split and a CLIP pretrained contrastively on its clean images."""
    data = digits_base_to_novel_split(seed)
    tokenizer = default_tokenizer()
    torch.manual_seed(seed)
    clip = small_clip(tokenizer.vocab_size)
    n_check = 200  # clean pretraining images kept out of pretraining, for its check
    pretrain_clip(
        clip,
        data.pretrain_x[n_check:],
        data.pretrain_y[n_check:],
        tokenizer,
        seed=seed,
        epochs=3 if quick else 30,
        device=device,
    )
    task = ClipTask(data, tokenizer, clip, 0.0)
    check = HeadClassifier(head(clip, task, DIGIT_NAMES))
    acc = accuracy(check, _batches(data.pretrain_x[:n_check], data.pretrain_y[:n_check]), device)
    progress(f"{TASK} | pretrained contrastively: clean 10-way zero-shot accuracy {acc:.4f}")
    return replace(task, proto=clip.cpu().eval(), pretrain_accuracy=acc)


def _plan(clip: nn.Module, recipe: Recipe, budget: float) -> unipeft.BudgetPlan:
    assert recipe.method is not None
    spec = unipeft.get_method(recipe.method)
    sized = spec.budget_field is not None and spec.budget_field not in recipe.config
    return unipeft.plan_budget(
        clip, recipe.method, budget if sized else 1.0, targets=recipe.targets, **recipe.config
    )


def run_recipe(
    task: ClipTask,
    recipe: Recipe,
    seed: int,
    device: torch.device,
    budget: float,
    fit: tuple[Tensor, Tensor],
    tests: Sequence[tuple[Tensor, Tensor, Sequence[str]]],
) -> tuple[Row, list[float]]:
    """Train ``recipe`` from the pretrained CLIP on ``fit`` (images, base labels), then
    score each of ``tests`` (images, labels, class names); the row (accuracy: the harmonic
    mean of the first two scores, or the first alone) and the scores."""
    torch.manual_seed(seed)
    clip = copy.deepcopy(task.proto)
    total = count_parameters(clip)
    config: dict[str, Any] = {}
    model: nn.Module = clip
    clip.requires_grad_(recipe.family == "full")
    if recipe.method is not None:
        p = _plan(clip, recipe, budget)
        model = unipeft.apply(clip, p.method, targets=p.targets, **p.config)
        config = dict(p.config)
    model.to(device)
    x, y = fit
    clf = HeadClassifier(head(model, task, task.base_names)).to(device)
    seconds, peak, trainable = 0.0, 0, count_parameters(model, trainable_only=True)
    probe: LinearProbe | None = None
    if recipe.family == "probe":
        with PeakMemory(device) as memory:
            began = time.perf_counter()
            with torch.no_grad():
                feats = torch.cat(
                    [clf.head.image_features(b["pixels"].to(device)) for b, _ in _batches(x, y)]
                )
                probe = LinearProbe(clf.head.text_features(), float(clip.logit_scale.exp()))
            train(
                probe,
                TensorExamples("features", feats, y.to(device)),
                shuffled(len(y), BATCH),
                fetched,
                lr=recipe.lr,
                head_lr=None,
                epochs=recipe.epochs,
                seed=seed,
                device=device,
                measure_memory=False,
            )
            seconds = time.perf_counter() - began
        peak, trainable = memory.bytes, count_parameters(probe)
    elif recipe.epochs > 0:
        result = train(
            clf,
            TensorExamples("pixels", x, y),
            shuffled(len(y), BATCH),
            fetched,
            lr=recipe.lr,
            head_lr=None,
            epochs=recipe.epochs,
            seed=seed,
            device=device,
        )
        seconds, peak = result.seconds, int(result.peak_memory_bytes or 0)
    model.eval()
    scores = []
    for i, (tx, ty, names) in enumerate(tests):
        if probe is not None and i == 0:  # base classes: the trained probe
            with torch.no_grad():
                feats = clf.head.image_features(tx.to(device))
                scores.append(float((probe(feats).argmax(-1).cpu() == ty).float().mean()))
            continue
        scorer = HeadClassifier(head(model, task, names)).to(device)
        scores.append(accuracy(scorer, _batches(tx, ty), device))
    base = scores[0]
    novel = scores[1] if len(scores) > 1 else None
    row = Row(
        task=TASK,
        method=recipe.name,
        family=recipe.family,
        trainable_fraction=trainable / total,
        accuracy=base if novel is None else harmonic_mean(base, novel),
        train_seconds=seconds,
        peak_memory_bytes=peak,
        seed=seed,
        hyperparameters=recipe.hyperparameters(config or None) if recipe.epochs else {},
        base_accuracy=base,
        novel_accuracy=novel,
    )
    return row, scores


def _available(recipe: Recipe) -> str | None:
    """Why ``recipe`` cannot run here (its method is not registered), or None."""
    if recipe.method is None:
        return None
    if recipe.method not in {m.id for m in unipeft.list_methods()}:
        return f"method {recipe.method!r} is not registered in this unipeft; its row is skipped"
    return None


def run(
    seed: int,
    quick: bool,
    device: torch.device,
    budget: float,
    progress: Callable[[str], None],
    only: Sequence[str] | None = None,
    select: bool = False,
) -> list[Row]:
    """Every CLIP recipe (or those in ``only``); ``select``: choose each learning rate on
    the held-out base shots first (base accuracy; the novel classes play no part)."""
    task = build_task(seed, quick, device, progress)
    d = task.data
    tests = [
        (d.base_test_x, d.base_test_y, task.base_names),
        (d.novel_test_x, d.novel_test_y, task.novel_names),
    ]
    val = [(d.val_x, d.val_y, task.base_names)]
    rows = []
    for recipe in recipes(quick):
        if only is not None and recipe.name not in only:
            continue
        missing = _available(recipe)
        if missing is not None:
            progress(f"{TASK} | {recipe.name}: {missing}")
            continue
        scores: dict[str, float] = {}
        if select and recipe.epochs > 0:

            def score(r: Recipe) -> float:
                return run_recipe(task, r, seed, device, budget, (d.train_x, d.train_y), val)[
                    0
                ].accuracy

            recipe, scores = select_lr(recipe, score)
            progress(
                f"{TASK} | {recipe.name}: validation "
                + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
            )
        row, _ = run_recipe(task, recipe, seed, device, budget, (d.train_x, d.train_y), tests)
        row = replace(row, validation=scores)
        progress(
            f"{TASK} | {row.method}: base {row.base_accuracy:.4f}, novel {row.novel_accuracy:.4f}, "
            f"HM {row.accuracy:.4f}, {100 * row.trainable_fraction:.3g}% trainable, "
            f"{row.train_seconds:.1f}s"
        )
        rows.append(row)
    return rows
