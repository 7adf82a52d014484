"""Telling the engines where a unipeft model's blocks and deltas are.

A :class:`~unipeft.DeltaModel` keeps its delta modules under ``model.deltas`` (beside the
backbone, not inside its blocks), so the deltas and whatever the backbone has outside its
blocks (embeddings, final norm, head) share the outermost unit of a sharded model. The
blocks are found through the backbone's structure map (its ``block`` sites), so the same
call works on every backbone unipeft has a map for.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from ..contract.errors import AdapterError
from ..runtime.registry import registry
from ..runtime.targets import all_sites
from . import gather


def _delta_model(model: nn.Module, what: str) -> nn.Module:
    if not hasattr(model, "deltas") or not hasattr(model, "base_model"):
        raise TypeError(
            f"{what} takes the DeltaModel that unipeft.apply() or unipeft.load() returned, "
            f"got {type(model).__name__}"
        )
    return model


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model``'s backbone (every tower's), in order: the modules
    FSDP wraps one unit each. ``model`` is a DeltaModel or a plain backbone; empty when the
    structure map knows no blocks (a generic backbone)."""
    backbone = getattr(model, "base_model", model)
    reg = registry()
    found: dict[int, nn.Module] = {}
    for site in all_sites(backbone, reg.pick_map(backbone)):
        if site.role == "block" and getattr(site, "module", None) is not None:
            found.setdefault(id(site.module), site.module)
    return list(found.values())


def shard(model: nn.Module, *, mesh: Any = None, **fully_shard_kwargs: Any) -> nn.Module:
    """Shard ``model`` with FSDP2, the way PyTorch documents it: ``fully_shard`` on every
    block of the backbone, then on the DeltaModel itself (its unit holds the deltas and the
    backbone's parameters outside the blocks). Returns ``model`` (now also an
    ``FSDPModule``). ``mesh`` and ``fully_shard_kwargs`` (``mp_policy``,
    ``reshard_after_forward``, ``offload_policy``...) go to every ``fully_shard`` call;
    without ``mesh`` FSDP2 uses every rank of the default process group.

    Call it after every adapter is added or loaded, and before building the optimizer (the
    parameters become ``DTensor`` shards). Frozen and trainable parameters may share a
    unit, and so may dtypes: adapters may stay in float32 beside a bfloat16 backbone."""
    model = _delta_model(model, "shard()")
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:  # pragma: no cover - torch < 2.6
        raise AdapterError(
            f"shard() needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6): {exc}"
        ) from None
    if not gather.initialized():
        raise AdapterError(
            "shard() needs a torch.distributed process group: launch with torchrun or "
            "accelerate launch and call torch.distributed.init_process_group() first"
        )
    if gather.sharding_engine(model) is not None:
        raise AdapterError("this model is already sharded; call shard() once")
    if model.merged:
        raise AdapterError(
            "shard() got a model with merged adapters; unmerge() before sharding (a sharded "
            "model cannot unmerge), or save() and load the adapters onto the merged backbone"
        )
    kwargs = dict(fully_shard_kwargs)
    if mesh is not None:
        kwargs["mesh"] = mesh
    for block in blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    gather.mark_engine(model)
    return model


def fsdp_wrap_policy(model: nn.Module) -> Callable[..., bool]:
    """An ``auto_wrap_policy`` for FSDP1 (``FullyShardedDataParallel``) that wraps each block
    of ``model``'s backbone in its own unit; the deltas stay in the outermost unit with the
    backbone's embeddings and head. That unit mixes frozen and trainable parameters, so wrap
    with ``use_orig_params=True``::

        FSDP(model, auto_wrap_policy=fsdp_wrap_policy(model), use_orig_params=True, ...)
    """
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    model = _delta_model(model, "fsdp_wrap_policy()")
    ids = {id(b) for b in blocks(model)}
    gather.mark_engine(model)
    if not ids:
        raise AdapterError(
            f"the structure map of {type(model.base_model).__name__} names no blocks to wrap; "
            "pass FSDP your own auto_wrap_policy"
        )
    return functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: id(m) in ids)


def block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of the backbone's blocks: what ``transformer_layer_cls`` (FSDP1's
    ``transformer_auto_wrap_policy``) and accelerate's ``fsdp_transformer_layer_cls_to_wrap``
    take."""
    return {type(b) for b in blocks(model)}


def unwrap(model: nn.Module) -> nn.Module:
    """The DeltaModel inside an engine's wrapper: DDP's and FSDP1's ``.module``, a DeepSpeed
    engine's ``.module``, ``torch.compile``'s ``_orig_mod``; ``model`` itself otherwise."""
    seen = 0
    while not (hasattr(model, "deltas") and hasattr(model, "base_model")) and seen < 8:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model, seen = inner, seen + 1
    return model


def save(model: nn.Module, directory: str, adapters: Any = None) -> None:
    """``DeltaModel.save`` through whatever wraps the model, on every rank: under FSDP1 the
    wrapper gathers the full parameters first (``summon_full_params``); under FSDP2,
    DeepSpeed ZeRO-3, DDP or in one process this is ``unwrap(model).save(...)``."""
    inner = _delta_model(unwrap(model), "save()")
    fsdp1 = gather._fsdp1_class()
    if fsdp1 is not None and isinstance(model, fsdp1):
        with fsdp1.summon_full_params(model, writeback=False, recurse=True):
            inner.save(directory, adapters)
        return
    inner.save(directory, adapters)
