"""DeepSpeed ZeRO-3: seeing the full value of partitioned parameters.

Under ZeRO stage 3 every parameter of the engine's module is cut into one slice per rank:
outside the module's forward its ``data`` is an empty tensor, and DeepSpeed records the real
shape in ``ds_shape``. Code that reads or writes whole tensors outside a forward pass
(saving adapters, folding a delta into a base weight, putting the weight back) must first
gather them on every rank, and, when it changes them, hand the changed values back so that
each rank keeps its slice of the new tensor.

This module does that and nothing else; DeepSpeed is imported only when a partitioned
parameter is actually met, so everything here is a no-op (and costs nothing) for plain
tensors, ZeRO stages 1 and 2, DDP and a single process.

- :func:`is_partitioned`: whether a tensor is a ZeRO-3 parameter;
- :func:`gathered`: a context in which given ZeRO-3 parameters hold their full data on
  every rank (with ``modifier_rank``, changes made there are kept);
- :func:`gather_for_save`: full, detached CPU copies of tensors by name, for writing;
- :func:`full_state_dict`: a module's state dict with every tensor whole, on the CPU;
- :func:`merge_parameters`: the tensors a merge or unmerge of some attachments reads or
  writes (the sites' weights and biases and the deltas' parameters).

Every function that gathers is a collective: call it on every rank, in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "full_state_dict",
    "gather_for_save",
    "gathered",
    "gathered_size",
    "is_partitioned",
    "merge_parameters",
]

# DeepSpeed marks a parameter gathered by an open GatheredParameters context with this
# attribute (a depth counter); a second context over the same parameter is an error there
_OPEN_CONTEXT = "_ds_z3_gathered_param_context_depth"


def is_partitioned(tensor: Any) -> bool:
    """True when ``tensor`` is a parameter that DeepSpeed ZeRO-3 manages (it carries
    ``ds_id``, ``ds_status`` and ``ds_shape``), whether or not its data is gathered now.
    False for every other object, plain tensors and ZeRO-1/2 parameters included. Never
    imports DeepSpeed."""
    return (
        isinstance(tensor, Tensor)
        and hasattr(tensor, "ds_id")
        and hasattr(tensor, "ds_status")
        and hasattr(tensor, "ds_shape")
    )


def _partitioned(params: Iterable[Any]) -> list[Tensor]:
    """The ZeRO-3 parameters among ``params``, once each, in a rank-independent order,
    leaving out those an enclosing :func:`gathered` already holds."""
    seen: dict[int, Tensor] = {}
    for p in params:
        if is_partitioned(p) and getattr(p, _OPEN_CONTEXT, 0) == 0:
            seen.setdefault(int(p.ds_id), p)  # type: ignore[attr-defined]
    return [seen[k] for k in sorted(seen)]


@contextlib.contextmanager
def gathered(params: Iterable[Any], modifier_rank: int | None = None) -> Iterator[None]:
    """Inside the block, every ZeRO-3 parameter among ``params`` holds its full data on
    every rank; other entries (plain tensors, ``None``, ZeRO-1/2 parameters) are ignored, and
    with no ZeRO-3 parameter at all the block runs as is and nothing is imported.

    ``modifier_rank=None``: read only; the gathered data is dropped on exit (DeepSpeed
    raises if it was changed in place when its sanity checks are on). ``modifier_rank=r``:
    on exit rank ``r``'s values are broadcast and every rank keeps its slice of them, so
    changes made in the block (the same on every rank, or made on ``r`` alone) stay.

    A parameter that an enclosing ``gathered`` block already holds is left to that block,
    so these blocks nest. A collective: every rank enters it with the same parameters.
    """
    todo = _partitioned(params)
    if not todo:
        yield
        return
    import deepspeed  # only once a ZeRO-3 parameter is met

    with deepspeed.zero.GatheredParameters(todo, modifier_rank=modifier_rank):
        yield


def gather_for_save(tensors_by_name: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{name: full tensor}``: detached, contiguous CPU copies of ``tensors_by_name``, ZeRO-3
    parameters gathered first. Every rank gets the full copies (a collective: call it on
    every rank); the caller decides which rank writes them."""
    with gathered(tensors_by_name.values()):
        return {
            name: t.detach().to("cpu", copy=True).contiguous()
            for name, t in tensors_by_name.items()
        }


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` with every entry whole (ZeRO-3 parameters gathered) and
    copied to the CPU. A collective when the module holds ZeRO-3 parameters."""
    with gathered(module.parameters()):
        return {
            name: t.detach().to("cpu", copy=True).contiguous()
            for name, t in module.state_dict().items()
        }


def merge_parameters(attachments: Iterable[Any]) -> list[Tensor]:
    """The tensors a merge or unmerge of ``attachments`` reads or writes: the weight and
    bias of each attachment's site module (whole parameters, not the site's slice views)
    and every parameter of its delta. Pass them to ``gathered(..., modifier_rank=0)``
    around the merge ledger's work; duplicates and plain tensors are harmless there."""
    out: list[Tensor] = []
    for att in attachments:
        site = att.site
        parameter = getattr(site, "parameter", None)
        if callable(parameter):
            for which in ("weight", "bias"):
                t = parameter(which)
                if isinstance(t, Tensor):
                    out.append(t)
        out.extend(att.delta.parameters())
    return out


def gathered_size(tensor: Tensor) -> torch.Size:
    """The full shape of ``tensor``: DeepSpeed's ``ds_shape`` for a ZeRO-3 parameter (whose
    own ``shape`` is empty outside a gather), else ``tensor.shape``."""
    if is_partitioned(tensor):
        return torch.Size(tensor.ds_shape)  # type: ignore[attr-defined]
    return tensor.shape
