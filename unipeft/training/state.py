"""Training state as plain tensors and JSON: trainable weights, optimizer, random generators.

Everything here round-trips bit-exactly through safetensors (tensors) and JSON (the rest), so
a checkpoint never needs pickle and loading one never executes code from a file.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..contract.errors import UnipeftError
from ..distributed.gather import full_tensor, shard_like


class TrainingError(UnipeftError, ValueError):
    """Training cannot start as asked (device, model, output folder, checkpoint)."""


class CheckpointError(TrainingError):
    """A checkpoint is missing, incomplete, or does not fit this model or configuration."""


def _delta_prefixes(model: nn.Module) -> list[str]:
    from ..model import DeltaModel

    found = [n for n, m in model.named_modules() if isinstance(m, DeltaModel)]
    return [f"{n}.deltas." if n else "deltas." for n in found]


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The trained part of ``model``, as CPU tensors keyed like ``model.state_dict()``.

    That is every parameter with ``requires_grad``, plus every entry (parameters and buffers)
    of the delta modules of any :class:`~unipeft.DeltaModel` inside ``model``. Sharded
    (FSDP2) tensors are gathered whole: under FSDP2 every rank must call this.
    """
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prefixes = tuple(_delta_prefixes(model))
    return {
        k: full_tensor(v.detach()).to("cpu").clone().contiguous()
        for k, v in model.state_dict().items()
        if k in trainable or (prefixes and k.startswith(prefixes))
    }


def load_trainable_state(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Copy ``state`` (from :func:`trainable_state`) into ``model``; the keys must match.
    Under FSDP2 each rank keeps its shard of every whole tensor."""
    expected = set(trainable_state_keys(model))
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise CheckpointError(
            f"the checkpoint in {where} does not fit this model: missing {missing[:5]}, "
            f"unexpected {extra[:5]}. Resume with the model it was written for, or start a "
            "new run in another output_dir"
        )
    current = model.state_dict()
    wrong = [k for k in state if tuple(state[k].shape) != tuple(current[k].shape)]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"the checkpoint in {where} does not fit this model: {k} has shape "
            f"{tuple(state[k].shape)} there, {tuple(current[k].shape)} here (a different method "
            "config?). Resume with the model it was written for, or use another output_dir"
        )
    kind = [
        k
        for k in state
        if state[k].is_floating_point() != current[k].is_floating_point()
        or (not current[k].is_floating_point() and state[k].dtype != current[k].dtype)
    ]
    if kind:
        k = kind[0]
        raise CheckpointError(
            f"the checkpoint in {where} does not fit this model: {k} is {state[k].dtype} "
            f"there, {current[k].dtype} here; a checkpoint converts no integer tensor into a "
            "floating-point one (or back). Resume with the model it was written for"
        )

    state = {k: shard_like(v, current[k]) for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys


def trainable_state_keys(model: nn.Module) -> list[str]:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prefixes = tuple(_delta_prefixes(model))
    return [
        k for k in model.state_dict() if k in trainable or (prefixes and k.startswith(prefixes))
    ]


def optimizer_to_parts(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``opt.state_dict()`` into tensors (``state/<param>/<name>``) and JSON values;
    sharded (FSDP2) tensors gathered whole (under FSDP2 every rank must call this)."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, Tensor):
                whole = full_tensor(value.detach()).to("cpu").clone().contiguous()
                tensors[f"state/{pid}/{name}"] = whole
            else:
                scalars.setdefault(str(pid), {})[name] = value
    groups = [dict(g) for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars, "type": type(opt).__name__}


def optimizer_from_parts(
    opt: torch.optim.Optimizer, tensors: dict[str, Tensor], doc: dict[str, Any]
) -> None:
    """Load what :func:`optimizer_to_parts` wrote into ``opt`` (same parameters, same order)."""
    if doc.get("type") != type(opt).__name__:
        raise CheckpointError(
            f"the checkpoint holds {doc.get('type')} state but the trainer uses "
            f"{type(opt).__name__}; resume with the same optimizer"
        )
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split("/", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, entry in doc["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in doc["param_groups"]
    ]
    sizes = [len(g["params"]) for g in groups]
    if sizes != [len(g["params"]) for g in opt.param_groups]:
        raise CheckpointError(
            f"the checkpoint's optimizer.json has param groups of {sizes} parameters, the "
            f"trainer's optimizer {[len(g['params']) for g in opt.param_groups]}; resume with "
            "the same model and group_lr"
        )
    params = [p for g in opt.param_groups for p in g["params"]]
    for pid, entry in state.items():
        if not 0 <= pid < len(params):
            raise CheckpointError(
                f"the checkpoint's optimizer state names parameter {pid}, and the trainer's "
                f"optimizer has {len(params)}; resume with the same model and group_lr"
            )
        for name, value in entry.items():
            if not isinstance(value, Tensor):
                continue
            fits = value.dim() == 0 or tuple(value.shape) == tuple(params[pid].shape)
            if not fits or not value.is_floating_point():
                raise CheckpointError(
                    f"the checkpoint's optimizer tensor state/{pid}/{name} is "
                    f"{value.dtype} {tuple(value.shape)}; parameter {pid} is "
                    f"{tuple(params[pid].shape)}: a floating-point tensor of that shape (or "
                    "a 0-d scalar) is accepted"
                )
            if value.dim():  # a whole tensor: this rank's shard of it under FSDP2
                entry[name] = shard_like(value, params[pid])
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as exc:
        raise CheckpointError(
            f"the checkpoint's optimizer state does not fit the trainer's optimizer ({exc}); "
            "resume with the same model and optimizer settings, or use another output_dir"
        ) from None


def rng_to_parts() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every global generator: torch CPU (and CUDA) as uint8 tensors, Python's and NumPy's."""
    tensors = {"torch/cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch/cuda/{i}"] = s
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    tensors["numpy/keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    doc = {
        "python": [version, list(internal), gauss],
        "numpy": [name, int(pos), int(has_gauss), float(cached)],
    }
    return tensors, doc


def rng_from_parts(tensors: dict[str, Tensor], doc: dict[str, Any]) -> None:
    """Restore the generators :func:`rng_to_parts` captured."""
    torch.set_rng_state(tensors["torch/cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch/cuda/")), key=lambda k: int(k[11:]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    version, internal, gauss = doc["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = doc["numpy"]
    keys = tensors["numpy/keys"].numpy().astype(np.uint32)
    np.random.set_state((name, keys, pos, has_gauss, cached))
