"""``unipeft train``'s engine: build the task from a :class:`RunConfig`, then train it.

Everything is validated and built before anything is written: on an error the output folder
is left as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..contract.errors import UnipeftError
from .checkpoint import check_writable, publish
from .spec import RunConfig, RunConfigError, load_run_config
from .state import CheckpointError
from .task import TextClassifier, build_backbone, classification_loss, make_dataset
from .trainer import EvalFn, Trainer, TrainResult

CLASSIFIER = "classifier"


@dataclass
class RunResult:
    """The trainer's result, the adapter's size, and where the classifier head went."""

    train: TrainResult
    trainable: int
    backbone_parameters: int
    method_config: dict[str, object]
    classifier_dir: Path


def prepare(cfg: RunConfig, *, progress: bool = True) -> tuple[Trainer, list[str], RunConfig]:
    """Build the model, data and trainer for ``cfg``; writes nothing. Returns the trainer,
    the label names, and ``cfg`` with ``config`` set to the method config actually used."""
    import unipeft

    try:
        check_writable(cfg.output_dir)
    except CheckpointError as exc:
        raise RunConfigError(str(exc)) from None
    backbone, encode, hidden = build_backbone(cfg.model, cfg.data.max_length)
    train_set, labels = make_dataset(cfg.data, cfg.data.path, encode)
    eval_set = None
    if cfg.data.eval_path is not None:
        eval_set, _ = make_dataset(cfg.data, cfg.data.eval_path, encode, labels)
    config, targets = dict(cfg.config), cfg.targets
    try:
        if cfg.budget is not None:
            plan = unipeft.plan_budget(backbone, cfg.method, cfg.budget, targets=targets, **config)
            config, targets = plan.config, plan.targets
        torch.manual_seed(cfg.trainer.seed)  # the delta's and the head's initialisation
        encoder = unipeft.apply(backbone, cfg.method, targets=targets, **config)
    except UnipeftError as exc:
        raise RunConfigError(
            f"method {cfg.method!r} on {cfg.model}: {exc} (fix method, config, budget or "
            "targets in the YAML)"
        ) from None
    config = encoder.adapters["default"].config.model_dump(mode="json")  # every field, as used
    model = TextClassifier(encoder, hidden, len(labels))
    eval_fn = _accuracy(eval_set, cfg.trainer.batch_size) if eval_set is not None else None
    trainer = Trainer(
        model,
        classification_loss,
        train_set,
        cfg.trainer,
        output_dir=cfg.output_dir,
        eval_fn=eval_fn,
        progress=progress,
    )
    return trainer, labels, cfg.model_copy(update={"config": config, "targets": targets})


def run(cfg: RunConfig | str | Path, *, resume: bool = False, progress: bool = True) -> RunResult:
    """Train the run configuration ``cfg`` (a :class:`RunConfig` or a YAML path).

    Writes ``output_dir/checkpoint/``, ``metrics.jsonl``, ``adapter/`` (the unipeft adapter)
    and ``classifier/`` (the head as safetensors, the labels and the run config as JSON).
    """
    if not isinstance(cfg, RunConfig):
        cfg = load_run_config(cfg)
    trainer, labels, used = prepare(cfg, progress=progress)
    model = trainer.model
    assert isinstance(model, TextClassifier)
    result = trainer.train(resume=resume)

    def fill(tmp: Path) -> None:
        head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
        save_file(head, str(tmp / "head.safetensors"))
        doc = {"labels": labels, "run": used.model_dump(mode="json")}
        (tmp / "classifier.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")

    where = publish(cfg.output_dir, CLASSIFIER, fill)
    return RunResult(
        train=result,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        backbone_parameters=sum(p.numel() for p in model.encoder.base_model.parameters()),
        method_config=dict(used.config),
        classifier_dir=where,
    )


def _accuracy(examples: list[dict[str, torch.Tensor]], batch_size: int) -> EvalFn:
    """Accuracy and mean loss on ``examples``."""

    def eval_fn(model: nn.Module) -> dict[str, float]:
        device = next(p.device for p in model.parameters())
        correct = total = 0
        loss = 0.0
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            batch = {k: torch.stack([e[k] for e in chunk]).to(device) for k in chunk[0]}
            logits = model(batch["input_ids"], batch["attention_mask"])
            loss += float(nn.functional.cross_entropy(logits, batch["label"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["label"]).sum())
            total += len(chunk)
        return {"eval_accuracy": correct / total, "eval_loss": loss / total}

    return eval_fn
