"""Every registered method that attaches to the tiny Llama, under FSDP2 or DDP on 2 ranks.

``python _sweep.py ENGINE OUT``: for each method (default config), one SGD step on each
rank's half of the global batch, then ``save`` on every rank into ``OUT/ENGINE/<method>``.
Methods whose default targets do not exist on a Llama (CLIP's, vision-only) are listed in
``OUT/sweep-ENGINE.json`` with the reason, as is any method that raised."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(__file__))
import _cases

import unipeft
import unipeft.distributed as ud
from unipeft.contract.errors import UnipeftError

# defaults sized for real models, too large for the tiny Llama's 32-wide projections
SMALL = {
    "c3a": {"block_size": 8},
    "fourierft": {"n_frequency": 64},
    "miss": {"r": 4},
    "road": {"group_size": 8},
    "vblora": {"vector_length": 8},
    "waveft": {"n_frequency": 64},
}


def sweep_model(method: str) -> unipeft.DeltaModel:
    """``method`` (defaults, or :data:`SMALL`) on the tiny Llama, every trainable tensor
    moved off its initial value, as :func:`_cases.model` does."""
    return _cases.perturbed(unipeft.apply(_cases.backbone(), method, **SMALL.get(method, {})))


def methods() -> list[str]:
    return [m.id for m in unipeft.list_methods()]


def main(engine: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per = _cases.GLOBAL_BATCH // world
    local = _cases.batch()[rank * per : (rank + 1) * per]
    report: dict[str, str] = {}
    for method in methods():
        try:
            model = sweep_model(method)
        except UnipeftError as exc:
            report[method] = f"skipped: {exc}"
            continue
        try:
            wrapped = ud.shard(model) if engine == "fsdp2" else DistributedDataParallel(model)
            _cases.one_step(wrapped, local)
            model.save(str(out / engine / method))
            report[method] = "ok"
        except Exception as exc:  # recorded; the parent test fails on it
            report[method] = f"failed: {type(exc).__name__}: {exc}"
        dist.barrier()
    if rank == 0:
        (out / f"sweep-{engine}.json").write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
