"""One rank of ``tests/test_engine_caches.py``: under DeepSpeed ZeRO stages 1, 2 and 3, an
evaluation without gradients after training steps sees the trained adapter.

``python _eval_worker.py OUT``: for each stage, LoRA on q, v and mlp.down of the tiny Llama
(q and v share their input, so LoRA stacks their factors and keeps the stack between passes
without gradients), an evaluation, two steps, then the loss without gradients and with them
(with gradients nothing is cached). Rank 0 writes both losses per stage to ``OUT``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import _cases

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # inference-only, compiles


def _loss(engine: torch.nn.Module, ids: torch.Tensor, grad: bool) -> float:
    with torch.set_grad_enabled(grad):
        return float(engine(input_ids=ids, labels=ids).loss.detach())


def main(out: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per = _cases.GLOBAL_BATCH // world
    ids = _cases.batch()[rank * per : (rank + 1) * per]
    seen = {}
    for stage in (1, 2, 3):
        model = _cases.model("lora")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=_cases.LR)
        config = {
            "train_micro_batch_size_per_gpu": per, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        }  # fmt: skip
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)

        first = _loss(engine, ids, grad=False)  # fills LoRA's cache of stacked factors
        for _ in range(2):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        after = _loss(engine, ids, grad=False)
        seen[stage] = {"before": first, "no_grad": after, "grad": _loss(engine, ids, grad=True)}
    if rank == 0:
        out.write_text(json.dumps(seen))
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
