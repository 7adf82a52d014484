"""A score past initialisation: train a small LoRA probe at every candidate site for a few
steps, then measure how much each site's trained update matters.

The gradient scores in :mod:`.sensitivity` are first-order at a zero-initialised delta:
they say where a *small step* lowers the loss most. The probe asks where a *trained*
update ends up mattering. A rank-``r`` LoRA is attached at every site the targets reach
(through ``unipeft``'s own attach path, so fused slices, ``nn.MultiheadAttention``'s
in-projection, convolutions and recurrent weights take part like any projection), trained
with Adam for ``steps`` steps on the calibration batches (cycled), and then each site is
scored by the sensitivity AdaLoRA uses for its rank allocation, averaged over the batches:

``probe = mean_b Σ_{θ ∈ site} |θ · ∂L_b/∂θ|``

the sum over the site's probe parameters of the first-order loss change of setting each
one back to zero. :func:`~unipeft.analysis.place` divides it by the method's cost at the
site like every other score.

The probe is removed afterwards (``unload``); the backbone's parameters, flags and the
global random state are as they were.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..contract.errors import AdapterError, ConfigError

__all__ = ["probe_importance"]


def probe_importance(
    model: nn.Module,
    batches: Sequence[Any],
    loss_fn: Any,
    targets: Sequence[str],
    *,
    rank: int,
    steps: int,
    lr: float,
) -> dict[str, float]:
    """The ``probe`` score of every site ``targets`` reach, by site name (see the module
    docstring). ``loss_fn(model, batch)`` returns the scalar loss of one batch."""
    from ..model import DeltaModel

    if steps < 1:
        raise ConfigError(f"probe_steps={steps}: train the probe for at least one step")
    if not lr > 0:
        raise ConfigError(f"probe_lr={lr}: the probe's learning rate must be positive")
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    was_training = model.training
    with torch.random.fork_rng(devices=devices):  # the probe's init draws no user randomness
        torch.manual_seed(0)
        try:
            wrapped = DeltaModel(model)
            wrapped.add_adapter("probe", "lora", targets=list(targets), r=rank, alpha=rank)
        except AdapterError as err:
            raise ConfigError(
                "the probe score trains a temporary LoRA on the plain backbone, and this one "
                f"cannot take it ({err}); score the backbone before attaching adapters, or "
                "use the taylor, fisher or grad_norm score"
            ) from err
        try:
            model.eval()
            per_site = {
                a.site.name: [p for p in a.delta.parameters() if p.requires_grad]
                for a in wrapped.adapters["probe"].attachments
            }
            params = [p for ps in per_site.values() for p in ps]
            opt = torch.optim.Adam(params, lr=lr)
            for batch in itertools.islice(itertools.cycle(batches), steps):
                opt.zero_grad(set_to_none=True)
                _loss(loss_fn, model, batch).backward()
                opt.step()
            sums = dict.fromkeys(per_site, 0.0)
            for batch in batches:
                opt.zero_grad(set_to_none=True)
                _loss(loss_fn, model, batch).backward()
                for name, ps in per_site.items():
                    sums[name] += sum(
                        float((p.detach() * p.grad).abs().sum()) for p in ps if p.grad is not None
                    )
        finally:
            wrapped.unload()
            model.train(was_training)
    return {name: total / len(batches) for name, total in sums.items()}


def _loss(loss_fn: Any, model: nn.Module, batch: Any) -> Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ConfigError("loss_fn(model, batch) must return the scalar loss tensor")
    return loss
