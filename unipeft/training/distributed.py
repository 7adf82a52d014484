"""The trainer launched as several processes (``torchrun``, ``accelerate launch``).

The trainer uses ``torch.distributed`` itself, not accelerate's ``Accelerator``: both
launchers set the same environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), from which :func:`setup` starts the process group when
the caller has not, so one code path serves both and accelerate stays optional.

- :func:`setup`: the process group, this rank's device, the engine to wrap with.
- :func:`wrap`: DDP, or FSDP2 through :func:`unipeft.distributed.shard`.
- :func:`rank_batches`: each rank's slice of every global batch.
- :class:`Ranks`: who writes, barriers, the loss averaged over the ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import gather
from .config import DistributedConfig
from .state import TrainingError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Ranks:
    """This process's place among the ranks, and the engine the model is wrapped with
    (``None`` in one process)."""

    rank: int = 0
    world: int = 1
    engine: str | None = None
    started_group: bool = False
    """Whether :func:`setup` started the process group (the caller may end it)."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, value: Tensor) -> Tensor:
        """``value`` averaged over the ranks (itself in one process)."""
        if self.world == 1:
            return value
        total = value.detach().clone().float()
        torch.distributed.all_reduce(total)
        return total / self.world


def launched_world() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _accelerate_fsdp2() -> bool:
    """Whether ``accelerate launch`` was configured for FSDP version 2."""
    on = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")
    return on and os.environ.get("FSDP_VERSION", "1") == "2"


def setup(cfg: DistributedConfig, device: str) -> tuple[Ranks, str]:
    """Join (or start, from the launcher's environment) the process group; this rank's
    device (``cuda`` becomes ``cuda:LOCAL_RANK``; ``cuda:N`` is kept) and the engine to
    wrap with."""
    started = False
    if not gather.initialized() and launched_world() > 1:
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise TrainingError(
                f"WORLD_SIZE is {launched_world()} but {', '.join(missing)} is not set; launch "
                "with torchrun or accelerate launch, or unset WORLD_SIZE to train in one process"
            )
        backend = cfg.backend
        if backend == "auto":
            backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl" and not device.startswith("cuda"):
            raise TrainingError(
                f"the nccl backend needs CUDA devices, and the trainer runs on {device!r}; "
                "set distributed.backend to gloo (or auto), or train on cuda"
            )
        torch.distributed.init_process_group(backend)
        started = True
    world = gather.world_size()
    if world > 1 and device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    if device.startswith("cuda") and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))  # plain "cuda": the current device
    engine = None
    if world > 1:
        engine = cfg.engine
        if engine == "auto":
            engine = "fsdp2" if _accelerate_fsdp2() else "ddp"
    return Ranks(gather.rank(), world, engine, started), device


def wrap(model: nn.Module, ranks: Ranks, cfg: DistributedConfig, device: str) -> nn.Module:
    """``model`` ready to train with ``ranks.engine``: a ``DistributedDataParallel``
    around it, or ``model`` itself sharded in place by FSDP2 (its DeltaModel through
    :func:`unipeft.distributed.shard`, then ``model`` when it holds the DeltaModel with
    more around it, such as a classifier head). In one process, ``model`` as it is."""
    if ranks.engine is None:
        return model
    wrapped = isinstance(model, nn.parallel.DistributedDataParallel) or gather.sharding_engine(
        model
    )
    if wrapped:
        raise TrainingError(
            f"the model is already wrapped for several processes ({type(model).__name__}, "
            f"{gather.sharding_engine(model) or 'DDP'}); give the trainer the model itself: it "
            "wraps it as config.distributed.engine says"
        )
    if ranks.engine == "ddp":
        ids = [torch.device(device)] if device.startswith("cuda") else None
        return nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=cfg.find_unused_parameters
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .. import distributed as ud
    from ._util import find_delta_model

    kwargs: dict[str, Any] = {"reshard_after_forward": cfg.reshard_after_forward}
    if cfg.param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=_DTYPES[cfg.param_dtype], reduce_dtype=torch.float32
        )
    inner = find_delta_model(model)
    if inner is not None:
        ud.shard(inner, **kwargs)
    if inner is not model:
        fully_shard(model, **kwargs)
    return model


def check_batches(size: int, batch_size: int, world: int) -> None:
    """Refuse a global batch the ranks cannot share equally (the one-process result holds
    only when every rank's slice has as many examples)."""
    if world == 1:
        return
    if batch_size % world:
        raise TrainingError(
            f"batch_size {batch_size} is the global batch and must divide among the {world} "
            f"ranks; use a multiple of {world}"
        )
    last = size % batch_size
    if last and last < world:
        raise TrainingError(
            f"the last batch of each epoch holds {last} example(s) ({size} examples, "
            f"batch_size {batch_size}), fewer than the {world} ranks; drop or add examples, "
            "or choose another batch_size"
        )


def rank_batches(batches: list[list[int]], ranks: Ranks) -> list[list[int]]:
    """This rank's part of each global batch: consecutive slices, as equal as they can be
    (rank ``r`` of ``w`` takes the ``r``-th of ``w`` slices)."""
    if ranks.world == 1:
        return batches
    out = []
    for batch in batches:
        if len(batch) < ranks.world:
            raise TrainingError(
                f"a batch of {len(batch)} example(s) cannot be shared by {ranks.world} ranks; "
                "every batch needs at least one example per rank"
            )
        base, extra = divmod(len(batch), ranks.world)
        start = ranks.rank * base + min(ranks.rank, extra)
        out.append(batch[start : start + base + (ranks.rank < extra)])
    return out
