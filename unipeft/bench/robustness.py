"""``unipeft bench robustness``: the demo's recipes on clean and corrupted test inputs.

Every recipe of the demo (:mod:`unipeft.demo`) trains once per task exactly as the demo
trains it (same data, seed, budget, learning rates), on clean data; the trained classifier
is then scored on the clean test set and on corrupted copies of it
(:mod:`unipeft.bench.corruptions`): images under five corruptions, the VADER words under
three, and, on the CLIP task, the images under the five and the prompts under other
templates, each at severities 1-3. Per row:

* ``clean``: test accuracy (CLIP: the harmonic mean of base and novel accuracy);
* ``corrupted[c][s]``: the same under corruption ``c`` at severity ``s`` (None where the
  corruption does not reach the row's input: prompt templates for rows that learn their
  prompt context in place of a template);
* ``mca``: the mean of ``corrupted`` over every corruption and severity that applies;
* ``relative``: ``mca / clean``;
* ``vs_full``: ``mca / mca`` of full fine-tuning on the same task (None without it).

The rows' clean accuracies are checked against the ones the demo's own scoring gives, so a
change in the demo's data or models cannot silently desynchronise the two. See
docs/robustness.md.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..contract.errors import UnipeftError
from .corruptions import (
    IMAGE_CORRUPTIONS,
    IMAGE_LEVELS,
    PROMPT_TEMPLATES,
    SEVERITIES,
    TEXT_CORRUPTIONS,
    TEXT_LEVELS,
    corrupt_images,
    corrupt_words,
    generator,
)

__all__ = [
    "TASKS",
    "RobustnessError",
    "RobustnessRow",
    "recipe_names",
    "run_robustness",
    "with_metrics",
]

TASKS = ("text", "vision", "clip")
PROMPTS = "prompt_template"
"""The CLIP task's prompt corruption (templates of :data:`~.corruptions.PROMPT_TEMPLATES`)."""
FULL = "full fine-tuning"
Progress = Callable[[str], None]
Scores = dict[str, dict[str, float | None]]


class RobustnessError(UnipeftError):
    """What the robustness benchmark was asked for cannot be run."""


@dataclass(frozen=True)
class RobustnessRow:
    """One task and recipe: clean and corrupted accuracies, and the metrics of them."""

    task: str
    method: str
    family: str
    trainable_fraction: float
    clean: float
    corrupted: Scores
    """Corruption -> severity (``"1"``, ``"2"``, ``"3"``) -> accuracy (None: not applicable)."""
    seed: int = 0
    mca: float | None = None
    relative: float | None = None
    vs_full: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    """Task-specific parts (CLIP: base and novel accuracy per condition)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: Any) -> float | None:
    """The mean of the values that are not None (None if there are none)."""
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else None


def with_metrics(rows: Sequence[RobustnessRow]) -> list[RobustnessRow]:
    """``rows`` with ``mca``, ``relative`` and ``vs_full`` computed (see the module doc)."""
    done = []
    for row in rows:
        mca = _mean(v for sev in row.corrupted.values() for v in sev.values())
        relative = mca / row.clean if mca is not None and row.clean > 0 else None
        done.append(replace(row, mca=mca, relative=relative))
    full = {r.task: r.mca for r in done if r.method == FULL}
    return [
        replace(r, vs_full=r.mca / full[r.task] if r.mca is not None and full.get(r.task) else None)
        for r in done
    ]


def recipe_names(quick: bool = False) -> dict[str, list[str]]:
    """Task -> the demo's recipe names on it (the choices of ``--methods``)."""
    from ..demo import clip, text, vision

    return {
        "text": [r.name for r in text.recipes(quick)],
        "vision": list(
            dict.fromkeys(r.name for kind in vision.BACKBONES for r in vision.recipes(quick, kind))
        ),
        "clip": [r.name for r in clip.recipes(quick)],
    }


def check_request(tasks: Sequence[str], methods: Sequence[str] | None) -> None:
    """Refuse unknown tasks or recipes, or a choice that leaves a task with nothing to run
    (before anything trains)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise RobustnessError(f"tasks must be some of {', '.join(TASKS)}; got {list(tasks)}")
    if methods is None:
        return
    names = recipe_names()
    every = sorted({n for t in TASKS for n in names[t]})
    bad = [m for m in methods if m not in every]
    if bad or not methods:
        raise RobustnessError(
            f"unknown recipe(s) {bad or '(none given)'}; the demo's recipes are: "
            + ", ".join(every)
        )
    empty = [t for t in tasks if not set(methods) & set(names[t])]
    if empty:
        raise RobustnessError(
            f"none of the recipes {list(methods)} runs on task(s) {', '.join(empty)}; "
            f"drop them from --tasks or add one of: "
            + "; ".join(f"{t}: {', '.join(names[t])}" for t in empty)
        )


# ------------------------------------------------------------------ keeping the trained model
def _keeping(make: Callable[[], nn.Module], kept: list[nn.Module]) -> Callable[[], nn.Module]:
    """``make``, remembering what it returns: the demo's ``run_recipe`` trains the model it
    gets from ``Task.make`` in place, so the last one kept is the trained classifier."""

    def make_and_keep() -> nn.Module:
        model = make()
        kept.append(model)
        return model

    return make_and_keep


class _KeptCopies:
    """A stand-in for the CLIP task's prototype: the demo's CLIP ``run_recipe`` starts each
    row from ``copy.deepcopy(task.proto)``; this returns such a copy (of the real
    prototype) and remembers it, so the backbone the row trained can be scored again."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.copies: list[nn.Module] = []

    def __deepcopy__(self, memo: dict[int, Any]) -> nn.Module:
        twin = copy.deepcopy(self.module, memo)
        self.copies.append(twin)
        return twin


def _same(label: str, ours: float, demo: float) -> None:
    if abs(ours - demo) > 1e-9:
        raise RobustnessError(
            f"{label}: the clean test set rebuilt here scores {ours:.6f}, the demo's own "
            f"scoring {demo:.6f}; the benchmark no longer matches the demo's data"
        )


def _classifier_rows(
    task: Any,
    recipes: Sequence[Any],
    budget: float,
    clean: Sequence[Any],
    corrupted: dict[str, dict[int, Sequence[Any]]],
    seed: int,
    device: torch.device,
    progress: Progress,
) -> list[RobustnessRow]:
    """Train each recipe on ``task`` with the demo's ``run_recipe``; score the classifier
    on ``clean`` (checked against the demo's accuracy) and every corrupted batch list."""
    from ..demo.runner import run_recipe
    from ..demo.train import accuracy

    rows = []
    for recipe in recipes:
        kept: list[nn.Module] = []
        row = run_recipe(
            replace(task, make=_keeping(task.make, kept)), recipe, seed, device, budget
        )
        clf = kept[-1]
        _same(f"{task.name} | {recipe.name}", accuracy(clf, clean, device), row.accuracy)
        scores: Scores = {
            kind: {str(s): accuracy(clf, batches, device) for s, batches in levels.items()}
            for kind, levels in corrupted.items()
        }
        rows.append(_row(row, scores, progress))
    return rows


def _row(row: Any, scores: Scores, progress: Progress, **details: Any) -> RobustnessRow:
    out = with_metrics(
        [
            RobustnessRow(
                task=row.task,
                method=row.method,
                family=row.family,
                trainable_fraction=row.trainable_fraction,
                clean=row.accuracy,
                corrupted=scores,
                seed=row.seed,
                details=details,
            )
        ]
    )[0]
    progress(f"{row.task} | {row.method}: clean {out.clean:.4f}, mCA {out.mca:.4f}")
    return out


# ------------------------------------------------------------------ the tasks
def _text_rows(
    seed: int, quick: bool, device: torch.device, only: Sequence[str] | None, progress: Progress
) -> list[RobustnessRow]:
    from ..demo import TEXT_BUDGET, text
    from ..demo.data import vader_polarity_split
    from ..demo.models import load_minilm

    picked = [r for r in text.recipes(quick) if only is None or r.name in only]
    task = text.build_task(seed, quick)
    split = vader_polarity_split(seed)
    words, labels = split.test_texts, split.test_labels
    if quick:  # as text.build_task cuts the quick test set
        words, labels = words[:256], labels[:256]
    _, tokenizer = load_minilm()
    pad = int(tokenizer.pad_token_id)

    def batches(ws: Sequence[str]) -> list[Any]:
        return text.eval_batches(text.encode(tokenizer, ws), labels, 256, pad)

    corrupted = {
        kind: {
            s: batches(corrupt_words(words, kind, s, generator(seed, "text", kind)))
            for s in SEVERITIES
        }
        for kind in TEXT_CORRUPTIONS
    }
    return _classifier_rows(
        task, picked, TEXT_BUDGET, batches(words), corrupted, seed, device, progress
    )


def _image_sets(x: Tensor, seed: int, where: str) -> dict[str, dict[int, Tensor]]:
    return {
        kind: {s: corrupt_images(x, kind, s, generator(seed, where, kind)) for s in SEVERITIES}
        for kind in IMAGE_CORRUPTIONS
    }


def _vision_rows(
    seed: int, quick: bool, device: torch.device, only: Sequence[str] | None, progress: Progress
) -> list[RobustnessRow]:
    from ..demo import VISION_BUDGET, vision
    from ..demo.data import digits_transfer_split

    data = digits_transfer_split(seed, max_adapt_train=160 if quick else None)
    x, y = data.adapt.test_x, data.adapt.test_y
    corrupted = {
        kind: {s: vision.image_batches(cx, y) for s, cx in levels.items()}
        for kind, levels in _image_sets(x, seed, "vision").items()
    }
    rows: list[RobustnessRow] = []
    for kind in vision.BACKBONES:
        picked = [r for r in vision.recipes(quick, kind) if only is None or r.name in only]
        if not picked:
            continue
        task = vision.build_task(kind, data, seed, quick, device, progress)
        clean = vision.image_batches(x, y)
        budget = vision.budget_for(kind, VISION_BUDGET)
        rows += _classifier_rows(task, picked, budget, clean, corrupted, seed, device, progress)
    return rows


def _learned_context(proto: nn.Module, recipe: Any) -> bool:
    """Whether ``recipe``'s method learns the prompt's context in place of the template's
    words (CoOp, CoCoOp, MaPLe): hand-written templates then never reach its text tower."""
    import unipeft

    from ..methods.additive.coop import TextConditioned

    if recipe.method is None:
        return False
    handle = unipeft.apply(
        copy.deepcopy(proto), recipe.method, targets=recipe.targets, **recipe.config
    )
    return any(
        isinstance(att.delta, TextConditioned)
        for adapter in handle.adapters.values()
        for att in adapter.attachments
    )


def _clip_rows(
    seed: int, quick: bool, device: torch.device, only: Sequence[str] | None, progress: Progress
) -> list[RobustnessRow]:
    import unipeft

    from ..demo import VISION_BUDGET, clip

    task = clip.build_task(seed, quick, device, progress)
    d = task.data
    base = {"clean": {0: d.base_test_x}, **_image_sets(d.base_test_x, seed, "clip-base")}
    novel = {"clean": {0: d.novel_test_x}, **_image_sets(d.novel_test_x, seed, "clip-novel")}
    conditions = [(kind, s) for kind, levels in base.items() for s in levels]
    registered = {m.id for m in unipeft.list_methods()}
    rows = []
    for recipe in clip.recipes(quick):
        if (only is not None and recipe.name not in only) or (
            recipe.method is not None and recipe.method not in registered
        ):
            continue
        # run_recipe scores its first test with a trained probe and the others zero-shot:
        # a probe needs one call per condition; the other rows score them all at once
        groups = [[c] for c in conditions] if recipe.family == "probe" else [conditions]
        pairs: dict[tuple[str, int], tuple[float, float]] = {}
        for group in groups:
            tests = []
            for kind, s in group:
                tests += [
                    (base[kind][s], d.base_test_y, task.base_names),
                    (novel[kind][s], d.novel_test_y, task.novel_names),
                ]
            kept = _KeptCopies(task.proto)
            row, got = clip.run_recipe(
                replace(task, proto=kept), recipe, seed, device, VISION_BUDGET,
                (d.train_x, d.train_y), tests,
            )  # fmt: skip
            for i, cond in enumerate(group):
                pairs[cond] = (got[2 * i], got[2 * i + 1])
            if group[0] == ("clean", 0):
                clean_row, trained = row, kept.copies[-1]
        scores: Scores = {
            kind: {str(s): clip.harmonic_mean(*pairs[kind, s]) for s in SEVERITIES}
            for kind in IMAGE_CORRUPTIONS
        }
        prompt_pairs = _prompt_scores(task, recipe, trained, pairs["clean", 0], device)
        scores[PROMPTS] = {
            str(s): None if p is None else clip.harmonic_mean(*p) for s, p in prompt_pairs.items()
        }
        details = {
            "base_novel": {
                f"{kind}/{s}": list(p) for (kind, s), p in pairs.items() if kind != "clean"
            }
            | {f"{PROMPTS}/{s}": p and list(p) for s, p in prompt_pairs.items()},
            "clean_base": clean_row.base_accuracy,
            "clean_novel": clean_row.novel_accuracy,
        }
        rows.append(_row(clean_row, scores, progress, **details))
    return rows


def _prompt_scores(
    task: Any, recipe: Any, trained: nn.Module, clean: tuple[float, float], device: torch.device
) -> dict[int, tuple[float, float] | None]:
    """(base, novel) accuracy with the prompt templates of each severity, from the
    backbone the row trained (None for a row whose prompt context is learned). The head is
    rebuilt from that backbone with the demo's templates first and must give the row's
    clean scores. A probe's base classes are its trained weights, which no prompt reaches:
    their accuracy is the clean one."""
    from ..clip import zero_shot_head
    from ..demo import clip
    from ..demo.clipmodel import TEMPLATES
    from ..demo.train import accuracy

    if _learned_context(task.proto, recipe):
        return {s: None for s in SEVERITIES}
    d = task.data
    probe = recipe.family == "probe"
    sets = [(d.base_test_x, d.base_test_y, task.base_names)] if not probe else []
    sets.append((d.novel_test_x, d.novel_test_y, task.novel_names))
    trained.to(device).eval()

    def scores(templates: Sequence[str]) -> list[float]:
        out = []
        for x, y, names in sets:
            head = zero_shot_head(trained, names, templates=templates, tokenizer=task.tokenizer)
            batches = [({"pixels": x[i]}, y[i]) for i in torch.arange(len(y)).split(256)]
            out.append(accuracy(clip.HeadClassifier(head), batches, device))
        return ([clean[0]] if probe else []) + out

    again = scores(TEMPLATES)
    _same(f"{clip.TASK} | {recipe.name} (base)", again[0], clean[0])
    _same(f"{clip.TASK} | {recipe.name} (novel)", again[1], clean[1])
    return {s: tuple(scores(PROMPT_TEMPLATES[s])) for s in SEVERITIES}  # type: ignore[misc]


_RUNNERS = {"text": _text_rows, "vision": _vision_rows, "clip": _clip_rows}


def run_robustness(
    *,
    seed: int = 0,
    quick: bool = False,
    tasks: Sequence[str] = TASKS,
    methods: Sequence[str] | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train every chosen recipe on every chosen task and score it clean and corrupted;
    return the JSON-ready result (``rows`` as :meth:`RobustnessRow.as_dict`). Single
    process, one thread on the CPU: the same seed gives the same numbers."""
    from ..demo.train import set_determinism

    check_request(tasks, methods)
    say = progress or (lambda line: None)
    dev = torch.device(device)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    rows: list[RobustnessRow] = []
    try:
        set_determinism(seed, threads=1)
        with warnings.catch_warnings():  # library deprecation chatter, as in the demo
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            for task in TASKS:
                if task in tasks:
                    rows += _RUNNERS[task](seed, quick, dev, methods, say)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return {
        "seed": seed,
        "quick": quick,
        "device": device,
        "tasks": [t for t in TASKS if t in tasks],
        "methods": list(methods) if methods is not None else None,
        "seconds": time.perf_counter() - start,
        "severities": list(SEVERITIES),
        "image_corruptions": {k: list(v) for k, v in IMAGE_LEVELS.items()},
        "text_corruptions": {k: list(v) for k, v in TEXT_LEVELS.items()},
        "prompt_templates": {str(k): list(v) for k, v in PROMPT_TEMPLATES.items()},
        "rows": [r.as_dict() for r in with_metrics(rows)],
    }


# ------------------------------------------------------------------ outputs
SHORT = {
    "gaussian_noise": "noise",
    "gaussian_blur": "blur",
    "contrast": "contrast",
    "rotation": "rotation",
    "occlusion": "occlusion",
    "char_swap": "swaps",
    "casing": "casing",
    "repeat_letters": "repeats",
    PROMPTS: "prompts",
}


def _by_task(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["task"], []).append(row)
    return out


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """One markdown table per task: clean accuracy, each corruption's accuracy at
    severities 1 / 2 / 3, mCA, mCA / clean and mCA / full fine-tuning's mCA."""
    mode = "quick" if result["quick"] else "full"
    lines = [f"Robustness ({mode} run, seed {result['seed']}, {result['seconds']:.0f} s)", ""]
    for task, rows in _by_task(result["rows"]).items():
        kinds = list(rows[0]["corrupted"])
        head = ["recipe", "trainable %", "clean", *(f"{SHORT.get(k, k)} 1/2/3" for k in kinds)]
        head += ["mCA", "mCA / clean", "mCA / full FT"]
        lines += [f"**{task}**", "", "| " + " | ".join(head) + " |"]
        lines.append("| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |")
        for r in rows:
            cells = [r["method"], f"{100 * r['trainable_fraction']:.3g}", _fmt(r["clean"])]
            for k in kinds:
                values = [r["corrupted"][k].get(str(s)) for s in SEVERITIES]
                cells.append(
                    "n/a" if all(v is None for v in values) else " / ".join(map(_fmt, values))
                )
            cells += [_fmt(r["mca"]), _fmt(r["relative"]), _fmt(r["vs_full"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def heat_map(result: dict[str, Any], path: Path) -> None:
    """One panel per task: recipes by clean accuracy, each corruption's mean over the
    severities and mCA, coloured and written in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _by_task(result["rows"])
    fig, axes = plt.subplots(
        len(tasks), 1, figsize=(9, 0.42 * sum(len(r) + 3 for r in tasks.values())), squeeze=False
    )
    for ax, (task, rows) in zip(axes[:, 0], tasks.items(), strict=True):
        kinds = list(rows[0]["corrupted"])
        cols = ["clean", *(SHORT.get(k, k) for k in kinds), "mCA"]
        grid = []
        for r in rows:
            means = [_mean(r["corrupted"][k].values()) for k in kinds]
            grid.append([r["clean"], *means, r["mca"]])
        values = torch.tensor([[float("nan") if v is None else v for v in g] for g in grid])
        ax.imshow(values.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        for i, g in enumerate(grid):
            for j, v in enumerate(g):
                colour = "black" if v is None or v > 0.6 else "white"
                ax.text(j, i, _fmt(v, 2), ha="center", va="center", fontsize=7, color=colour)
        ax.set_xticks(range(len(cols)), labels=cols, fontsize=8)
        ax.set_yticks(range(len(rows)), labels=[r["method"] for r in rows], fontsize=8)
        ax.set_title(task, fontsize=9)
    mode = "quick" if result["quick"] else "full"
    fig.suptitle(f"Accuracy, clean and corrupted (mean over severities 1-3; {mode} run)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_outputs(result: dict[str, Any], directory: Path) -> list[Path]:
    """``robustness.json``, ``robustness.md`` and ``robustness.png`` in ``directory``."""
    from . import write_json

    write_json(directory / "robustness.json", result)
    (directory / "robustness.md").write_text(markdown(result), encoding="utf-8")
    heat_map(result, directory / "robustness.png")
    return [directory / n for n in ("robustness.json", "robustness.md", "robustness.png")]
