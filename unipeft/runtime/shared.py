"""An adapter's shared module (:attr:`unipeft.Method.shared`) at run time: its place in the
model, and the ``after_backward`` call that works in any training loop.

A method with ``shared`` builds one ``nn.Module`` per adapter (VeRA's frozen projections,
VB-LoRA's vector bank, AdaLoRA's rank allocator). It is registered beside the adapter's
deltas under :data:`~unipeft.contract.plan.SHARED`, so its parameters are trained, counted
and moved once, its persistent buffers saved once, and every delta refers to it
(:meth:`~unipeft.DeltaModule.use_shared`).

When the shared module defines ``after_backward(deltas)``, unipeft calls it once at the end
of every backward pass that gave the adapter's parameters a gradient while the module is in
training mode. The trigger is autograd itself (a hook on each parameter's gradient
accumulation queues one callback for the end of the pass), so it works in a plain PyTorch
loop, in :class:`unipeft.training.Trainer` and in an unmodified Hugging Face ``Trainer``
alike, with no callback to register. Gradients are populated then; the optimizer has not
stepped yet.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..contract.deltas import DeltaModule


class BackwardTrigger:
    """Calls ``shared.after_backward(deltas)`` once at the end of each backward pass that
    accumulates a gradient into one of ``params``."""

    def __init__(
        self, shared: nn.Module, deltas: Mapping[str, DeltaModule], params: list[nn.Parameter]
    ) -> None:
        self.shared = shared
        self.deltas = dict(deltas)
        self.queued = False
        self.handles: list[RemovableHandle] = [
            p.register_post_accumulate_grad_hook(self._on_grad) for p in params
        ]

    def _on_grad(self, _param: torch.Tensor) -> None:
        if self.queued or not self.shared.training:
            return
        self.queued = True
        # runs once the whole backward pass is over (every gradient accumulated)
        torch.autograd.Variable._execution_engine.queue_callback(self._fire)

    def _fire(self) -> None:
        self.queued = False
        self.shared.after_backward(self.deltas)  # type: ignore[operator]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def backward_trigger(
    shared: nn.Module | None, deltas: Mapping[str, DeltaModule]
) -> BackwardTrigger | None:
    """A :class:`BackwardTrigger` when ``shared`` asks for ``after_backward``, else None."""
    if shared is None or not callable(getattr(shared, "after_backward", None)):
        return None
    params = [p for d in deltas.values() for p in d.parameters()]
    params += list(shared.parameters())
    seen: set[int] = set()
    unique = [p for p in params if not (id(p) in seen or seen.add(id(p)))]  # type: ignore[func-returns-value]
    return BackwardTrigger(shared, deltas, unique)
