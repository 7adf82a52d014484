"""LoRA on a mixed batch: each sample through its own adapter, in a fixed number of kernels
whatever the number of adapters. Checked against the per-group path in
``tests/test_fast_paths.py`` and by the conformance kit's ``mixed_batch_matches``.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .fast import _view

if TYPE_CHECKING:
    from .delta import LoraDelta


def _mixed_masked(
    deltas: list[LoraDelta], x: Tensor, y: Tensor, slots: Tensor, cache: dict
) -> Tensor | None:
    """A mixed batch without gradients in three kernels and no per-sample gather: every
    adapter's ``x A_j^T`` at once (``(…, Σr)``), the columns of other adapters zeroed per
    sample, and one ``addmm_`` with every ``s_j B_j`` side by side. Used on GPUs while
    ``Σr`` is small (the zeroed columns are wasted work)."""
    total = sum(d.r for d in deltas)
    width = y.shape[-1]
    n = x.shape[0]
    y2 = _view(y, (-1, width))
    if total > 512 or y2 is None or y.shape[0] != n:
        return None
    key = tuple((id(d.A), d.A._version, id(d.B), d.B._version) for d in deltas)
    stack = cache.get("masked")
    if stack is None or stack[0] != key or stack[1].dtype != x.dtype:
        a = torch.cat([d.A for d in deltas]).to(x.dtype)
        b = torch.cat([d.B * d.scaling for d in deltas], dim=1).to(y.dtype)
        owner = torch.repeat_interleave(
            torch.arange(len(deltas), device=slots.device),
            torch.tensor([d.r for d in deltas], device=slots.device),
        )
        stack = cache["masked"] = (key, a, b, owner, {})
    _, a, b, owner, masks = stack
    ref = masks.get("slots")
    if ref is None or ref[0]() is not slots:  # one mask per routing (the model keeps those)
        masks["slots"] = (weakref.ref(slots), (slots.unsqueeze(1) == owner).to(x.dtype))
    mask = masks["slots"][1]
    h = F.linear(x, a).view(n, -1, total)
    h.mul_(mask.unsqueeze(1))
    y2.addmm_(h.view(-1, total).to(y.dtype), b.t())
    return y


def _stacked(deltas: list[LoraDelta], cache: dict) -> tuple[Tensor, Tensor]:
    # the key holds the deltas themselves (not their ids, which Python may reuse) and the
    # version counters that every in-place update of a factor bumps
    key = [(d, d.A._version, d.B._version) for d in deltas]
    grad = torch.is_grad_enabled() and any(d.A.requires_grad for d in deltas)
    old = cache.get("lora_key")
    if not grad and old is not None and len(old) == len(key):
        if all(o[0] is k[0] and o[1:] == k[1:] for o, k in zip(old, key)):
            return cache["lora_A"], cache["lora_B"]
    r = max(d.r for d in deltas)
    a = torch.stack([F.pad(d.A, (0, 0, 0, r - d.r)) for d in deltas])
    b = torch.stack([F.pad(d.B * d.scaling, (0, r - d.r)) for d in deltas])
    a = torch.cat([a, a.new_zeros(1, *a.shape[1:])])  # the slot of samples without one here
    b = torch.cat([b, b.new_zeros(1, *b.shape[1:])])
    if not grad:
        cache.update(lora_key=key, lora_A=a, lora_B=b)
    return a, b


def mixed_batch(
    deltas: list[LoraDelta], x: Tensor | None, y: Tensor, slots: Tensor, cache: dict
) -> Tensor | None:
    """Every adapter's LoRA on its own samples with two batched matmuls.

    Factors are padded to the largest rank and stacked, with a zero slot for samples
    without an adapter here: ``A`` ``(k+1, r, in)``, ``B·s`` ``(k+1, out, r)``; each
    sample gathers its pair. Stacks are reused while no factor changed. Without
    gradients the second matmul accumulates into ``y`` in place.
    """
    if x is None or any(d.shape.is_conv for d in deltas):
        return None
    if any(d.drops for d in deltas):
        return None  # dropout differs per adapter; the per-group path applies each one
    if not torch.is_grad_enabled() and x.device.type != "cpu":
        # on a GPU kernel launches cost more than the masked columns' arithmetic; on the
        # CPU the arithmetic dominates, so the per-sample gather below is cheaper there
        out = _mixed_masked(deltas, x, y, slots, cache)
        if out is not None:
            return out
    a, b = _stacked(deltas, cache)
    n = x.shape[0]
    h = torch.bmm(x.reshape(n, -1, x.shape[-1]), a.to(x.dtype)[slots].transpose(1, 2))
    bt = b.to(y.dtype)[slots].transpose(1, 2)
    grad = torch.is_grad_enabled() and (y.requires_grad or h.requires_grad)
    y3 = _view(y, (n, -1, y.shape[-1]))
    if not grad and y3 is not None:
        y3.baddbmm_(h.to(y.dtype), bt)
        return y
    return torch.baddbmm(y.reshape(n, -1, y.shape[-1]), h.to(y.dtype), bt).reshape(y.shape)
