"""LoRA started from the weight itself: PiSSA and OLoRA (``init="pissa"`` / ``"olora"``).

Both take the first ``r`` directions of the site's weight ``W`` (canonical ``(out, in·k)``)
as the initial factors ``B₀ A₀`` and train from there, leaving the rest of the weight,
``W − s·B₀A₀``, in the backbone:

- **PiSSA** (Meng et al., 2024, arXiv:2404.02948): ``W = U S Vᵀ``; ``A₀ = √(S_r / s) V_rᵀ``,
  ``B₀ = U_r √(S_r / s)``, so ``s·B₀A₀`` is the best rank-``r`` approximation of ``W``;
- **OLoRA** (Büyükakyüz, 2024, arXiv:2406.01775): ``W = Q R``; ``A₀ = R_r`` (first ``r``
  rows), ``B₀ = Q_r`` (first ``r`` columns).

The function is ``W x + s·(B A − B₀A₀) x``, the identity at init, and ``B₀``, ``A₀`` are
kept (persistent buffers, saved with the adapter) so that the residual can be rebuilt on
any backbone with the original weight. While the adapter runs alone on its sites (active,
adapters enabled, no mixed batch) the merge ledger holds the residual ``W − s·B₀A₀`` in
the weight and the delta adds only ``s·B A x`` (:meth:`residual`, ``residual_in_base``);
otherwise the weight is ``W`` bit for bit and the delta subtracts ``s·B₀A₀ x`` itself.
``unload()`` and ``unmerge()`` restore the original bits either way. A PEFT export writes
the exact equivalent plain LoRA of rank ``2r``: ``[B, −B₀] [A; A₀]`` (what PEFT's own
conversion of PiSSA/OLoRA adapters writes).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ....blocks import LowRankDelta, add_low_rank
from ....contract.deltas import ProjectionShape
from ....contract.sites import ModuleSite


class ResidualLoraDelta(LowRankDelta):
    """``y + s·(B A − B₀A₀) dropout(x)``, with ``B₀A₀`` left out when the ledger holds the
    residual in the weight. Parameters ``A``, ``B``; persistent buffers ``A0``, ``B0``."""

    def __init__(
        self,
        site: ModuleSite,
        r: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        init: str,
        lr_ratio: float = 1.0,
    ) -> None:
        shape = ProjectionShape.of(site)
        super().__init__(shape, r, alpha, dropout, use_rslora, "kaiming", lr_ratio)
        self.residual_in_base = False  # set by the merge ledger
        with torch.no_grad():
            weight, _ = site.weight_views()
            w = weight.detach().float().reshape(shape.out_features, -1)
            if init == "pissa":
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                root = (s[:r] / self.scaling).sqrt()
                a0, b0 = root[:, None] * vh[:r], u[:, :r] * root[None, :]
            elif init == "olora":
                q, rr = torch.linalg.qr(w)
                a0, b0 = rr[:r], q[:, :r]
            else:
                raise ValueError(f"unknown init {init!r}: use pissa or olora")
            a0 = a0.reshape(self.A.shape).to(self.A.dtype).contiguous()
            b0 = b0.to(self.B.dtype).contiguous()
            self.A.copy_(a0)
            self.B.copy_(b0)
        self.register_buffer("A0", a0.clone())
        self.register_buffer("B0", b0.clone())

    def _initial(self) -> Tensor:
        return (self.B0 @ self.A0.reshape(self.r, -1)) * self.scaling

    def delta_weight(self) -> Tensor:
        w = self.B @ self.A.reshape(self.r, -1)
        d = w * self.scaling - self._initial()
        return d.reshape(self.shape.out_features, *self.A.shape[1:])

    def residual(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The weight with ``s·B₀A₀`` taken out (the ledger writes it while the delta runs)."""
        return weight - self._initial().to(weight.dtype).reshape(weight.shape), bias

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if not self.residual_in_base:
            return super().merged(weight, bias)
        w = (self.B @ self.A.reshape(self.r, -1)) * self.scaling
        return weight + w.to(weight.dtype).reshape(weight.shape), bias

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        if self.shape.is_conv:
            up = self.conv_update(x)
            if not self.residual_in_base:
                k = len(self.shape.kernel_size)
                a0 = self.shape.project(x, self.A0.to(x.dtype))  # the residual sees x undropped
                b0 = self.B0.to(x.dtype).reshape(*self.B0.shape, *([1] * k))
                conv = (nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d)[k - 1]
                up = up - conv(a0, b0) * self.scaling
            return y + up
        out = add_low_rank(y, self.down(x), self.B, self.scaling)
        if self.residual_in_base:
            return out
        h0 = nn.functional.linear(x, self.A0.to(x.dtype))  # the residual sees x undropped
        return add_low_rank(out, h0, self.B0, -self.scaling)
