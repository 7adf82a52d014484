"""``unipeft train``'s engine: build the task from a :class:`RunConfig`, then train it.

Everything is validated and built before anything is written: on an error the output folder
is left as it was, and one that did not exist before the run does not exist after a failure
that leaves no checkpoint in it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..contract.errors import UnipeftError
from ..distributed.gather import full_tensor
from .checkpoint import check_writable, find_checkpoint, publish
from .data import Example, check_labels, read_examples
from .spec import RunConfig, RunConfigError, load_run_config
from .state import CheckpointError
from .task import Encode, TextClassifier, build_backbone, classification_loss, label_ids
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
        raise RunConfigError(f"{exc} (fix output_dir in the YAML)") from None
    spec = cfg.data
    rows = read_examples(spec.path, spec.text_column, spec.label_column)
    labels = label_ids([label for _, label, _ in rows])
    if len(labels) < 2:
        raise RunConfigError(
            f"data file {spec.path} has the single label {labels[0]!r}; classification needs "
            "at least two"
        )
    eval_rows = None
    if spec.eval_path is not None:
        eval_rows = read_examples(spec.eval_path, spec.text_column, spec.label_column,
                                  "data.eval_path")  # fmt: skip
        check_labels(spec.eval_path, eval_rows, labels)
    backbone, encode, hidden = build_backbone(cfg.model, spec.max_length)
    train_set = _examples(rows, labels, encode)
    eval_set = _examples(eval_rows, labels, encode) if eval_rows is not None else None
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
    trainer_cfg = cfg.trainer
    if "distributed" in cfg.model_fields_set:  # the YAML's top-level distributed: section
        trainer_cfg = trainer_cfg.model_copy(update={"distributed": cfg.distributed})
    trainer = Trainer(
        model,
        classification_loss,
        train_set,
        trainer_cfg,
        output_dir=cfg.output_dir,
        eval_fn=eval_fn,
        progress=progress,
    )
    return trainer, labels, cfg.model_copy(update={"config": config, "targets": targets})


def run(cfg: RunConfig | str | Path, *, resume: bool = False, progress: bool = True) -> RunResult:
    """Train the run configuration ``cfg`` (a :class:`RunConfig` or a YAML path).

    Writes ``output_dir/checkpoint/``, ``metrics.jsonl``, ``adapter/`` (the unipeft adapter)
    and ``classifier/`` (the head as safetensors, the labels and the run config as JSON).
    Launched as several processes (``torchrun``, ``accelerate launch``), every rank calls
    this; rank 0 writes, and the process group the trainer started is ended on return.
    """
    if not isinstance(cfg, RunConfig):
        cfg = load_run_config(cfg)
    created = _first_missing(cfg.output_dir)
    trainer: Trainer | None = None
    try:
        trainer, labels, used = prepare(cfg, progress=progress)
        model = trainer.model
        assert isinstance(model, TextClassifier)
        if resume:
            _check_checkpoint_documents(cfg.output_dir)
        result = trainer.train(resume=resume)
        # whole tensors (FSDP2 shards the head with the model): a collective, every rank
        head = {
            k: full_tensor(v.detach()).cpu().contiguous()
            for k, v in model.head.state_dict().items()
        }
    except BaseException:
        tidy = trainer is None or trainer.ranks.main
        if (
            tidy
            and created is not None
            and created.is_dir()
            and find_checkpoint(cfg.output_dir) is None
        ):
            shutil.rmtree(created, ignore_errors=True)  # made by this run, holds nothing to keep
        raise

    def fill(tmp: Path) -> None:
        save_file(head, str(tmp / "head.safetensors"))
        doc = {"labels": labels, "run": used.model_dump(mode="json")}
        (tmp / "classifier.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")

    assert trainer is not None
    ranks = trainer.ranks
    where = cfg.output_dir / CLASSIFIER
    if ranks.main:
        where = publish(cfg.output_dir, CLASSIFIER, fill)
    ranks.barrier()
    if ranks.started_group:
        torch.distributed.destroy_process_group()
    return RunResult(
        train=result,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        backbone_parameters=sum(p.numel() for p in model.encoder.base_model.parameters()),
        method_config=dict(used.config),
        classifier_dir=where,
    )


def _check_checkpoint_documents(output_dir: Path) -> None:
    """Refuse a checkpoint whose JSON files hold something other than an object (a file
    edited or damaged by hand), naming the file; the trainer checks the rest."""
    folder = find_checkpoint(output_dir)
    for path in sorted(folder.glob("*.json")) if folder is not None else ():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # the trainer reports an unreadable file, naming it
        if not isinstance(doc, dict):
            raise CheckpointError(
                f"{path} is damaged: it holds a JSON {type(doc).__name__}, not an object. "
                "Start a new run in another output_dir"
            )


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _examples(
    rows: list[Example], labels: list[str], encode: Encode
) -> list[dict[str, torch.Tensor]]:
    """The rows as dicts of tensors: ``input_ids``, ``attention_mask``, ``label`` (an index
    into ``labels``)."""
    enc = encode([text for text, _, _ in rows])
    index = {name: i for i, name in enumerate(labels)}
    return [
        {
            "input_ids": enc["input_ids"][i],
            "attention_mask": enc["attention_mask"][i],
            "label": torch.tensor(index[label]),
        }
        for i, (_, label, _) in enumerate(rows)
    ]


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
