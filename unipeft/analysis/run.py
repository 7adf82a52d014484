"""``unipeft analyze CONFIG.yaml``: the sensitivity scores and a placement for the method
of a ``unipeft train`` run configuration, on calibration batches from its training data.

The backbone and the data are built exactly as ``unipeft train`` builds them; the scores
use the classification loss through a freshly initialised head (seeded by
``trainer.seed``), so they describe the task at the start of training, where a
zero-initialised delta starts. Calibration batches are the first ``batches`` batches of a
seeded shuffle of the training file: never the evaluation file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..contract.errors import ConfigError
from ..training.data import read_examples
from ..training.spec import RunConfig
from ..training.task import TextClassifier, build_backbone, classification_loss, label_ids
from .placement import Placement, place, require_by
from .sensitivity import SCORES, SiteScore, score_sites, scores_table

__all__ = ["AnalysisResult", "analyze_run", "heatmap"]


@dataclass
class AnalysisResult:
    scores: list[SiteScore]
    placement: Placement
    calibration: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "calibration": self.calibration,
            "scores": scores_table(self.scores),
            "placement": asdict(self.placement) | {"fraction": self.placement.fraction},
        }

    def write(self, folder: Path, score: str) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / "analysis.json"
        out.write_text(json.dumps(self.as_json(), indent=1) + "\n")
        png = folder / f"heatmap-{score}.png"
        heatmap(self.scores, score, png)
        return [out, png]


def analyze_run(
    cfg: RunConfig,
    *,
    batches: int = 8,
    rank: int | None = None,
    score: str = "taylor",
    budget: float | str | None = None,
    targets: list[str] | None = None,
    by: str = "site",
    probe_steps: int = 32,
    probe_lr: float = 1e-3,
) -> AnalysisResult:
    if batches < 1:
        raise ConfigError(f"batches={batches}: score on at least one calibration batch")
    if score not in SCORES:
        raise ConfigError(f"score {score!r} is not one of {', '.join(SCORES)}")
    require_by(by)
    spec = cfg.data
    rows = read_examples(spec.path, spec.text_column, spec.label_column)
    labels = label_ids([label for _, label, _ in rows])
    backbone, encode, hidden = build_backbone(cfg.model, spec.max_length)
    torch.manual_seed(cfg.trainer.seed)
    clf = TextClassifier(backbone, hidden, len(labels))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.trainer.seed))
    size = cfg.trainer.batch_size
    index = {name: i for i, name in enumerate(labels)}
    calib = []
    for b in range(batches):
        picked = [rows[int(i)] for i in order[b * size : (b + 1) * size]]
        if not picked:
            break
        enc = encode([text for text, _, _ in picked])
        calib.append(
            {
                "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"],
                "label": torch.tensor([index[label] for _, label, _ in picked]),
            }
        )
    r = rank if rank is not None else int(cfg.config.get("r", 8))
    scores = score_sites(
        backbone, calib, lambda _bb, batch: classification_loss(clf, batch), rank=r,
        targets=targets, probe_steps=probe_steps if score == "probe" else 0, probe_lr=probe_lr,
    )  # fmt: skip
    chosen = place(
        backbone, scores, cfg.method, budget if budget is not None else (cfg.budget or "0.5%"),
        score=score, by=by, **cfg.config,
    )  # fmt: skip
    info = {
        "model": cfg.model,
        "data": str(spec.path),
        "batches": len(calib),
        "batch_size": size,
        "examples": sum(int(b["label"].numel()) for b in calib),
        "seed": cfg.trainer.seed,
        "rank": r,
        "score": score,
        "by": by,
        **({"probe_steps": probe_steps, "probe_lr": probe_lr} if score == "probe" else {}),
    }
    return AnalysisResult(scores, chosen, info)


def heatmap(scores: list[SiteScore], score: str, path: Path) -> None:
    """Roles down, layers across, each cell the site's score divided by the largest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = list(dict.fromkeys((s.tower + "/" if s.tower else "") + str(s.role) for s in scores))
    layers = sorted({s.layer for s in scores if s.layer is not None})
    grid = torch.full((len(roles), max(1, len(layers))), float("nan"))
    top = max(s.score(score) for s in scores) or 1.0
    for s in scores:
        if s.layer is None:
            continue
        row = roles.index((s.tower + "/" if s.tower else "") + str(s.role))
        grid[row, layers.index(s.layer)] = s.score(score) / top
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(layers), 0.9 + 0.4 * len(roles)))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(layers)), [str(i) for i in layers])
    ax.set_yticks(range(len(roles)), roles)
    ax.set_xlabel("layer")
    ax.set_title(f"{score} ÷ its largest value")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
