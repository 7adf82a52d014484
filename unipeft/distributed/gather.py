"""Which process is which, and how a sharded tensor becomes whole again.

Every function here is safe to call in a single process (no process group): ranks are
0 of 1, nothing is sharded, and gathering returns the tensor itself.

Sharded tensors come from two engines:

- FSDP2 (``torch.distributed.fsdp.fully_shard``) turns every parameter of a sharded module
  into a ``DTensor``; :func:`full_tensor` all-gathers it (``DTensor.full_tensor()``), a
  collective that every rank of the mesh must call in the same order.
- DeepSpeed ZeRO-3 partitions parameters in place (``ds_id``, ``ds_numel``...);
  :mod:`unipeft.distributed.zero` gathers them.

FSDP1 keeps its shards in flat parameters owned by the wrapper, so the wrapper gathers
them (``FullyShardedDataParallel.summon_full_params``): see :func:`unipeft.distributed.save`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from . import zero

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch: FSDP2 does not exist there either
    DTensor = None  # type: ignore[assignment,misc]


def initialized() -> bool:
    """Whether a ``torch.distributed`` process group is up."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return torch.distributed.get_rank() if initialized() else 0


def world_size() -> int:
    """How many processes train together (1 without a process group)."""
    return torch.distributed.get_world_size() if initialized() else 1


def is_main_process() -> bool:
    """Whether this process is global rank 0, the one that writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if initialized() and world_size() > 1:
        torch.distributed.barrier()


def is_dtensor(tensor: object) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` holds only part of its values on this rank: an FSDP2 ``DTensor``
    (of any placement: a replicated ``DTensor`` still needs ``full_tensor()`` to become a
    plain tensor) or a ZeRO-3 partitioned parameter."""
    return is_dtensor(tensor) or zero.is_partitioned(tensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of ``tensor`` as a plain tensor: a ``DTensor`` is all-gathered (every rank
    must call this for the same tensors in the same order); anything else is returned as is.
    ZeRO-3 parameters are gathered by :func:`gathered_parameters` instead."""
    if is_dtensor(tensor):
        return tensor.full_tensor()
    return tensor


@contextlib.contextmanager
def gathered_parameters(
    modules: Iterable[nn.Module], modifier_rank: int | None = None
) -> Iterator[None]:
    """Within the block, ZeRO-3 partitioned parameters of ``modules`` hold their full data on
    every rank; with ``modifier_rank`` set, that rank's changes are partitioned back on exit.
    A no-op when nothing is partitioned."""
    params = [p for m in modules for p in m.parameters() if zero.is_partitioned(p)]
    if not params:
        yield
        return
    with zero.gathered(params, modifier_rank=modifier_rank):
        yield


def full_state(owner: nn.Module) -> dict[str, torch.Tensor]:
    """``owner.state_dict()`` with every tensor whole and plain (detached): DTensors are
    all-gathered, ZeRO-3 parameters gathered. A collective when anything is sharded: call it
    on every rank, for the same modules, in the same order."""
    with gathered_parameters([owner]):
        out = {}
        for key, tensor in owner.state_dict().items():
            whole = full_tensor(tensor.detach())
            out[key] = whole.clone() if zero.is_partitioned(tensor) else whole
    return out


def any_sharded(modules: Iterable[nn.Module]) -> bool:
    """Whether any parameter or buffer of ``modules`` is sharded (:func:`is_sharded`)."""
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            if is_sharded(t):
                return True
    return False


def sharding_engine(model: nn.Module) -> str | None:
    """``"fsdp2"``, ``"fsdp1"`` or ``"zero3"`` when ``model``'s parameters are sharded by
    one of them, else ``None`` (a plain, DDP or ZeRO-1/2 model holds every weight whole)."""
    fsdp1 = _fsdp1_class()
    for m in model.modules():
        if fsdp1 is not None and isinstance(m, fsdp1):
            return "fsdp1"
    for p in model.parameters():
        if is_dtensor(p):
            return "fsdp2"
        if zero.is_partitioned(p):
            return "zero3"
    return None


def _fsdp1_class() -> type | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return FullyShardedDataParallel


def fsdp1_gathered(model: nn.Module) -> bool:
    """Whether ``model`` runs inside ``FullyShardedDataParallel.summon_full_params`` (every
    FSDP1 unit below it holds its full parameters), or has no FSDP1 unit below it."""
    fsdp1 = _fsdp1_class()
    if fsdp1 is None:
        return True
    units = [m for m in model.modules() if isinstance(m, fsdp1)]
    if not units:
        return True
    from torch.distributed.fsdp._common_utils import TrainingState

    return all(u.training_state == TrainingState.SUMMON_FULL_PARAMS for u in units)


def _own_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of a DeltaModel that are not the backbone's: its deltas, shared modules
    and fusion layers (whatever ``named_modules`` lists outside ``base_model``)."""
    return [
        m
        for n, m in model.named_modules()
        if n and n != "base_model" and not n.startswith("base_model.")
    ]


@contextlib.contextmanager
def whole_deltas(model: nn.Module) -> Iterator[None]:
    """Within the block, every parameter of ``model``'s deltas, shared modules and fusion
    layers is a whole, plain tensor of its own dtype, on every rank; on exit the sharded
    parameters are back as they were. A collective when the model is sharded: call it on
    every rank.

    - FSDP2: each ``DTensor`` parameter is all-gathered (``full_tensor()``, so in the
      parameter's own dtype even under a mixed-precision policy) and stands in for the
      shard on its module until the block ends (the shard itself is put back, so the
      optimizer and FSDP keep their references).
    - DeepSpeed ZeRO-3: the parameters are gathered in place (``GatheredParameters``).
    - FSDP1: the parameters must already be gathered by the wrapper
      (``unipeft.distributed.save(wrapper, dir)`` does it); otherwise an ``AdapterError``
      says so.
    """
    engine = sharding_engine(model)
    owners = _own_modules(model)
    if engine is None:
        yield
        return
    if engine == "fsdp1":
        if not fsdp1_gathered(model):
            from ..contract.errors import AdapterError

            raise AdapterError(
                "this model is sharded by FSDP1 (FullyShardedDataParallel), whose shards only "
                "its wrapper can gather: save with unipeft.distributed.save(fsdp_model, dir) "
                "on every rank, or inside FSDP.summon_full_params(fsdp_model)"
            )
        yield
        return
    if engine == "zero3":
        with gathered_parameters(owners):
            yield
        return
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in owners:
            for name, param in list(module._parameters.items()):
                if param is not None and is_dtensor(param):
                    whole = nn.Parameter(param.full_tensor().detach(), requires_grad=False)
                    swapped.append((module, name, param))
                    module._parameters[name] = whole
        yield
    finally:
        for module, name, param in reversed(swapped):
            module._parameters[name] = param


def on_main(write: Callable[[], None], *, collective: bool) -> None:
    """Run ``write`` on rank 0 only. With ``collective`` (every rank is in the call, as when
    the model is sharded), every rank waits for rank 0 and raises if its write failed, so
    that no rank reads a file that is not there; otherwise the other ranks return at once
    (a data-parallel run that saves from rank 0 alone does not wait for ranks that never
    call)."""
    if not collective or world_size() == 1:
        if is_main_process():
            write()
        return
    failure: list[str | None] = [None]
    raised: BaseException | None = None
    if is_main_process():
        try:
            write()
        except BaseException as exc:  # told to every rank below, then re-raised
            raised = exc
            failure[0] = f"{type(exc).__name__}: {exc}"
    torch.distributed.broadcast_object_list(failure, src=0)
    if raised is not None:
        raise raised
    if failure[0] is not None:
        from ..contract.errors import AdapterError

        raise AdapterError(f"rank 0 could not write the adapters: {failure[0]}")


def mark_engine(model: nn.Module) -> None:
    """Record that an engine which rewrites parameters in place manages ``model`` (see
    :func:`refresh_versions`); :func:`~unipeft.distributed.shard` and
    :func:`~unipeft.distributed.fsdp_wrap_policy` call it."""
    model.__dict__["_unipeft_engine"] = True


def _engine_managed(model: nn.Module) -> bool:
    if model.__dict__.get("_unipeft_engine"):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        FSDPModule = ()  # type: ignore[assignment]
    if isinstance(model, FSDPModule):  # FSDP2, however it was applied
        return True
    deltas = model.__dict__.get("_modules", {}).get("deltas")
    for param in deltas.parameters() if deltas is not None else ():
        if zero.is_partitioned(param):  # ZeRO-3 partitions every parameter
            return True
        if param.requires_grad:
            # DeepSpeed ZeRO-1/2 (and its bf16 optimizer) link each trainable parameter to
            # its fp32 master copy and write the updated values back through ``.data``
            return hasattr(param, "_hp_mapping")
    return False


def refresh_versions(model: nn.Module) -> None:
    """Before a forward pass without gradients of a model whose engine writes its
    parameters in place behind autograd's back (FSDP2's all-gathers into the unsharded
    parameters, FSDP1's views into a flat parameter, ZeRO-3's gathers, DeepSpeed's copies of
    its master weights into the parameters under ZeRO-1/2), bump the version
    counter of every delta parameter, so that what methods cache from them between passes
    without gradients (LoRA's stacked factors, keyed on each tensor's version) is built
    again from this pass's values. A no-op with gradients on (nothing is cached then, and
    a bump could invalidate tensors a pending backward saved) and without an engine."""
    if torch.is_grad_enabled() or not _engine_managed(model):
        return
    for module in _own_modules(model):
        for param in module._parameters.values():
            if param is not None:
                torch.autograd.graph.increment_version(param)


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) placed like ``like``: a ``DTensor`` with its mesh and
    placements when ``like`` is one (each rank keeps its own shard, no communication),
    else ``value`` itself."""
    if not is_dtensor(like):
        return value
    from torch.distributed.tensor import distribute_tensor

    local = like.to_local()
    return distribute_tensor(
        value.to(device=local.device, dtype=like.dtype), like.device_mesh, like.placements,
        src_data_rank=None,
    )  # fmt: skip
