"""One rank of the Trainer's multi-process tests (launched by torchrun or accelerate launch).

``python _train_worker.py OUT ENGINE... [--methods M,M] [--device cuda]``: for each ENGINE (``ddp``,
``fsdp2``, ``auto``) and each case of :mod:`_cases` (or the METHODS named), unipeft's
Trainer trains into ``OUT/ENGINE/METHOD`` on this rank's slice of every global batch; the
trainer starts the process group from the launcher's environment. With ``fsdp2`` among the
engines, a LoRA run is also stopped after one step and resumed. Rank 0 writes what it saw
to ``OUT/report.json``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import _cases


def main(out: Path, engines: list[str], methods: list[str], device: str) -> None:
    report: dict = {"cases": {}}
    first = True
    for engine in engines:
        for method in methods:
            result = _cases.trainer_run(
                method, out / engine / method, distributed=engine, device=device
            )
            if first:  # the first trainer started the process group from the environment
                report["first_started_group"], first = result.ranks.started_group, False
            report["cases"][f"{engine}/{method}"] = {
                "history": result.history, "engine": result.ranks.engine,
                "world": result.ranks.world, "adapter": str(result.adapter_dir),
            }  # fmt: skip
        if engine == "fsdp2":
            folder = out / "fsdp2-resumed"
            _cases.trainer_run("lora", folder, steps=1, distributed=engine, device=device)
            result = _cases.trainer_run(
                "lora", folder, resume=True, distributed=engine, device=device
            )
            report["resumed"] = {"start": result.start_step, "history": result.history}
    report["later_started_group"] = result.ranks.started_group
    grouped = dist.is_initialized()  # not with one process: the trainer starts no group then
    if not grouped or dist.get_rank() == 0:
        (out / "report.json").write_text(json.dumps(report))
    if grouped:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    args = sys.argv[2:]
    methods = list(_cases.CASES)
    if "--methods" in args:
        at = args.index("--methods")
        methods, args = args[at + 1].split(","), args[:at] + args[at + 2 :]
    device = "cpu"
    if "--device" in args:
        at = args.index("--device")
        device, args = args[at + 1], args[:at] + args[at + 2 :]
    main(Path(sys.argv[1]), args, methods, device)
