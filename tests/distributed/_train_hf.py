"""The Hugging Face ``transformers.Trainer`` on an unmodified unipeft model, in one process
or as one rank under ``accelerate launch`` (DDP, or FSDP through accelerate's plugin) or
``torchrun``.

``python _train_hf.py OUT [cuda]``: trains ``_cases.model("lora")`` for STEPS steps on the
global batch GLOBAL_BATCH (``per_device_train_batch_size = GLOBAL_BATCH / world``), then
calls ``model.save(OUT/adapter)`` on every rank (``unipeft.distributed.save(wrapper, ...)``
under FSDP1). Rank 0 writes ``OUT/report.json`` (the
logged losses, the world size, whether the parameters ended sharded)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
import _cases

import unipeft.distributed as ud

EXAMPLES = 16


def data() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 96, (EXAMPLES, _cases.LENGTH), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def train(out: Path, cuda: bool = False) -> dict:
    from transformers import Trainer, TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = _cases.model("lora")
    args = TrainingArguments(
        output_dir=str(out / "hf"), max_steps=_cases.STEPS, learning_rate=_cases.LR,
        per_device_train_batch_size=_cases.GLOBAL_BATCH // world, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=not cuda, seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data())
    trainer.train()
    engine = ud.sharding_engine(trainer.model_wrapped)
    if engine == "fsdp1":  # only FSDP1's wrapper can gather its flat shards
        ud.save(trainer.model_wrapped, str(out / "adapter"))
    else:  # every rank: the full adapters, written by rank 0
        model.save(str(out / "adapter"))
    report = {
        "world": ud.world_size(),
        "engine": engine,
        "wrapper": type(trainer.model_wrapped).__name__,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    if ud.is_main_process():
        (out / "report.json").write_text(json.dumps(report))
    return report


if __name__ == "__main__":
    train(Path(sys.argv[1]), sys.argv[2:] == ["cuda"])
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
