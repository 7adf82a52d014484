"""DoRA on a mixed batch: each sample through its own adapter, in a fixed number of kernels
whatever the number of adapters.

DoRA's output for one adapter ``j`` (:class:`~.dora.DoraDelta`) is

    g_j ⊙ (y − b + s_j · (x A_jᵀ) B_jᵀ) + b,     g_j = m_j / ‖W + s_j B_j A_j‖ (rows)

so a mixed batch is LoRA's mixed batch (:mod:`.lora.mixed`, the same kernels on the same
factors) followed by one elementwise pass, ``z ⊙ G + C`` with per-sample rows
``G = g_j`` and ``C = (1 − g_j) ⊙ b``, and ``G = 1``, ``C = 0`` for samples without a DoRA
adapter here: the operations and their order are the single-adapter forward's, per sample.

The gains ``g_j`` (one ``W A_jᵀ`` each) are computed once and kept while no factor, no
magnitude and not the base weight changed (version counters, as for DoRA's cached
``‖W‖²``). With gradients, on quantized weights and on convolutions this path declines and
the host runs each adapter on its own samples (the magnitude's gradient flows there).
"""

from __future__ import annotations

import operator
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ...contract.sites import weight_codec
from .lora import mixed as lora_mixed

if TYPE_CHECKING:
    from .dora import DoraDelta

_VERSION = operator.attrgetter("_version")


class _Gains:
    """Per-adapter ``g`` and ``(1 − g) ⊙ b`` rows of one site, in one dtype, for one list of
    deltas, while nothing they are computed from changes."""

    def __init__(
        self, deltas: list[DoraDelta], params: tuple[Tensor, ...], key: tuple, dtype: torch.dtype
    ) -> None:
        self.deltas = tuple(deltas)
        self.params = params
        self.versions = tuple(map(_VERSION, params))
        self.key, self.dtype = key, dtype
        weight, bias = deltas[0].base()
        with torch.no_grad():
            rows = []
            for d in deltas:  # the single-adapter forward's gain, to the bit
                norm = d.weight_norm(weight)
                rows.append((d.magnitude.detach().to(norm.dtype) / norm).to(dtype))
            g = torch.stack(rows)
            self.gain = torch.cat([g, g.new_ones(1, g.shape[1])])
            self.shift: Tensor | None = None
            if bias is not None:
                b = bias.to(dtype)
                c = torch.addcmul(b.expand_as(g), g, b.expand_as(g), value=-1.0)
                self.shift = torch.cat([c, c.new_zeros(1, c.shape[1])])
        self.routed: tuple[weakref.ref, tuple[Tensor, Tensor | None]] | None = None

    def current(
        self, deltas: list[DoraDelta], params: tuple[Tensor, ...], key: tuple, dtype: torch.dtype
    ) -> bool:
        return (
            dtype == self.dtype
            and key == self.key
            and len(deltas) == len(self.deltas)
            and all(map(operator.is_, deltas, self.deltas))
            and lora_mixed.unchanged(self.params, params, self.versions)
        )

    def rows(self, slots: Tensor) -> tuple[Tensor, Tensor | None]:
        """``G`` and ``C`` gathered per sample ``(N, out)``, kept for the routing."""
        ref = self.routed
        if ref is None or ref[0]() is not slots:
            shift = None if self.shift is None else self.shift[slots]
            ref = self.routed = (weakref.ref(slots), (self.gain[slots], shift))
        return ref[1]


def _weight_key(delta: DoraDelta) -> tuple | None:
    """What the gains depend on in the base layer: its weight and bias tensors and their
    versions; ``None`` for a quantized weight (a fresh dequantized copy on every read)."""
    site = delta.site
    w = site.parameter("weight")
    if w is None or weight_codec(w, site.module) is not None:
        return None
    b = site.parameter("bias")
    bias = () if b is None else (id(b), b._version, b.data_ptr())
    return (id(w), w._version, w.data_ptr(), w.device, *bias)


def mixed_batch(
    deltas: list[DoraDelta], x: Tensor | None, y: Tensor, slots: Tensor, cache: dict[str, Any]
) -> Tensor | None:
    """Every DoRA adapter on its own samples, possibly written into ``y``; ``None``
    declines (gradients, ``torch.compile``, quantized weights, convolutions, active
    dropout)."""
    if x is None or torch.is_grad_enabled() or y.shape[0] != slots.shape[0]:
        return None
    if torch.compiler.is_compiling():  # cached gains are Python state: the per-group path
        return None
    if any(d.shape.is_conv or d.drops for d in deltas):
        return None
    key = _weight_key(deltas[0])
    params = lora_mixed.registered(deltas, ("A", "B", "magnitude"))
    if key is None or params is None:
        return None
    gains = cache.get("dora_gains")
    if gains is None or not gains.current(deltas, params, key, y.dtype):
        gains = cache["dora_gains"] = _Gains(deltas, params, key, y.dtype)
    g, c = gains.rows(slots)
    # LoRA's part on its own cache: a site may hold LoRA and DoRA adapters side by side
    sub = cache.setdefault("dora_lora", {})
    z = lora_mixed.mixed_batch(deltas, x, y, slots, sub)  # type: ignore[arg-type]
    if z is None:
        return None
    shape = (g.shape[0],) + (1,) * (z.dim() - 2) + (g.shape[1],)
    if c is None:
        return z.mul_(g.view(shape))
    return torch.addcmul(c.view(shape), z, g.view(shape), out=z)
