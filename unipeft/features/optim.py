"""Optimizer parameter groups that methods ask for (LoRA+'s faster ``B``, for instance).

A delta (or an adapter's shared module) states learning-rate multipliers for some of its
parameters with :meth:`~unipeft.DeltaModule.lr_scale`. :func:`param_groups` turns a model's
trainable parameters into the groups any ``torch.optim`` optimizer takes, so the same
multipliers hold in a plain loop, in :class:`unipeft.training.Trainer` (which uses it) and in
a Hugging Face ``Trainer`` (pass ``optimizers=(torch.optim.AdamW(param_groups(model,
lr)), None)``)::

    opt = torch.optim.AdamW(unipeft.param_groups(model, lr=2e-4, weight_decay=0.01))
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["lr_scales", "param_groups"]


def lr_scales(model: nn.Module) -> dict[int, float]:
    """``{id(parameter): multiplier}`` for every parameter some delta or shared module of
    ``model`` scales (multipliers other than 1)."""
    out: dict[int, float] = {}
    for module in model.modules():
        scale = getattr(module, "lr_scale", None)
        if not callable(scale) or isinstance(module, type):
            continue
        asked = scale()
        if not isinstance(asked, dict):
            continue
        for name, factor in asked.items():
            try:
                p = module.get_parameter(name)
            except AttributeError as exc:
                raise ValueError(
                    f"{type(module).__name__}.lr_scale() names {name!r}, which is not one of "
                    f"its parameters ({', '.join(n for n, _ in module.named_parameters())})"
                ) from exc
            if not factor > 0:
                raise ValueError(
                    f"{type(module).__name__}.lr_scale() gives {name!r} the multiplier "
                    f"{factor!r}; a multiplier must be > 0"
                )
            if float(factor) != 1.0:
                out[id(p)] = float(factor)
    return out


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` as optimizer groups: one at ``lr``, and one per
    multiplier that a delta asks for at ``lr × multiplier`` (each group's ``"lr"`` is set;
    ``"weight_decay"`` is ``weight_decay`` for all)."""
    scales = lr_scales(model)
    by_scale: dict[float, list[Tensor]] = {}
    seen: set[int] = set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            by_scale.setdefault(scales.get(id(p), 1.0), []).append(p)
    return [
        {"params": ps, "lr": lr * s, "weight_decay": weight_decay}
        for s, ps in sorted(by_scale.items())
    ]
