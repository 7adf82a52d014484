"""One rank of the multi-process tests (launched by torchrun or accelerate launch).

``python _worker.py ENGINE OUT [cuda]``: ENGINE is ``ddp``, ``fsdp2`` or ``fsdp1`` (FSDP1
needs CUDA); with ``cuda`` each rank trains on its GPU over NCCL, else on the CPU over gloo.
For each case of :mod:`_cases`, every rank trains on its share of the global batch, saves
on every rank, then reloads the saved adapters onto a fresh backbone and evaluates the whole
batch. Rank 0 writes what it saw to ``OUT/report-ENGINE.json``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(__file__))
import _cases

import unipeft
import unipeft.distributed as ud
from unipeft.contract.errors import MergeError


def main(engine: str, out: Path, cuda: bool) -> None:
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per = _cases.GLOBAL_BATCH // world
    ids = _cases.batch().to(device)
    local = ids[rank * per : (rank + 1) * per]
    report: dict = {"world": world, "cases": {}}
    for method in _cases.CASES:
        if engine == "fsdp1" and method.endswith("@bf16"):
            continue  # FSDP1 flattens a unit into one tensor of one dtype (docs/distributed.md)
        model = _cases.model(method).to(device)
        if engine == "fsdp2":
            wrapped = ud.shard(model)
        elif engine == "fsdp1":
            wrapped = FSDP(
                model, auto_wrap_policy=ud.fsdp_wrap_policy(model), use_orig_params=True,
                device_id=device,
            )  # fmt: skip
        else:
            wrapped = DistributedDataParallel(model, device_ids=[device] if cuda else None)
        losses = list(_cases.steps(wrapped, local))
        folder = out / engine / method
        ud.save(wrapped, str(folder))  # every rank calls it; rank 0 writes
        seen: dict = {"losses": losses, "engine": ud.sharding_engine(model)}
        if method == "lora":
            try:
                model.merge()
            except MergeError as exc:
                seen["merge_error"] = str(exc)
            if engine == "fsdp1":
                with FSDP.summon_full_params(wrapped, writeback=False):
                    unipeft.interop.peft.save(model, out / engine / "peft_lora")
            else:
                unipeft.interop.peft.save(model, out / engine / "peft_lora")
        dist.barrier()
        # every rank restores the adapters onto a fresh backbone (sharded again under FSDP2)
        again = unipeft.load(_cases.backbone(), str(folder)).to(device)  # float32 backbone
        if engine == "fsdp2":
            ud.shard(again)
        with torch.no_grad():
            seen["reloaded_loss"] = float(again(input_ids=ids, labels=ids).loss)
        report["cases"][method] = seen
    if rank == 0:
        (out / f"report-{engine}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:] == ["cuda"])
