"""unipeft under the engines PyTorch users train with: DDP, FSDP2, FSDP1, DeepSpeed ZeRO.

Nothing here replaces an engine; it tells the engine what it needs to know about a
:class:`~unipeft.DeltaModel` and makes the DeltaModel's own operations (``save``,
``merge``...) correct when its parameters are sharded. ``docs/distributed.md`` shows how
to launch each engine.

- :func:`shard`: FSDP2 (``fully_shard`` on each block, then the model).
- :func:`fsdp_wrap_policy`, :func:`block_classes`: FSDP1's auto-wrap policy and the block
  classes accelerate and ``transformer_auto_wrap_policy`` ask for.
- :func:`save`: save through a wrapper (FSDP1 gathers through it).
- :func:`full_state`, :func:`full_tensor`, :func:`is_sharded`, :func:`sharding_engine`:
  what ``DeltaModel.save`` and the PEFT exporter use to write whole tensors from shards.
- :func:`shard_like`: a whole tensor placed like a sharded one (resuming under FSDP2).
- :func:`refresh_versions` (called by ``DeltaModel.forward``): caches keyed on tensor
  versions stay true under engines that gather into parameters in place.
- :func:`rank`, :func:`world_size`, :func:`is_main_process`, :func:`barrier`.
"""

from __future__ import annotations

from .engines import block_classes, blocks, fsdp_wrap_policy, save, shard, unwrap
from .gather import (
    any_sharded,
    barrier,
    full_state,
    full_tensor,
    gathered_parameters,
    initialized,
    is_main_process,
    is_sharded,
    on_main,
    rank,
    refresh_versions,
    shard_like,
    sharding_engine,
    whole_deltas,
    world_size,
)

__all__ = [
    "any_sharded",
    "barrier",
    "block_classes",
    "blocks",
    "fsdp_wrap_policy",
    "full_state",
    "full_tensor",
    "gathered_parameters",
    "initialized",
    "is_main_process",
    "is_sharded",
    "on_main",
    "rank",
    "refresh_versions",
    "save",
    "shard",
    "shard_like",
    "sharding_engine",
    "unwrap",
    "whole_deltas",
    "world_size",
]
