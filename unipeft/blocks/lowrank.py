"""The low-rank update of a projection, ``ΔW = s · B A``, as a reusable delta.

LoRA, DoRA, the experts of ``moe_lora`` and UniPELT's LoRA part are built on it, and so can
any plugin of the LoRA family: subclass :class:`LowRankDelta` and change what differs
(DoRA overrides ``forward`` and ``merged``), or use it as it is inside a hybrid or a mixture.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..contract.config import DeltaConfig
from ..contract.deltas import ProjectionShape, ReparameterizedDelta
from ..contract.sites import Site

Init = Literal["kaiming", "gaussian", "orthogonal"]


class LowRankConfig(DeltaConfig):
    """The fields every low-rank method shares. A method's config subclasses it and adds
    its own fields (or redefines one to change its description or bounds)."""

    r: int = Field(8, ge=1, le=4096, description="rank of the update")
    alpha: float = Field(16.0, gt=0, description="scale numerator: ΔW is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of A")
    use_rslora: bool = Field(
        False, description="rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski, 2023)"
    )
    init: Init = Field(
        "kaiming",
        description="init of A; B always starts at zero, so the adapter is the identity at init",
    )
    loraplus_lr_ratio: float = Field(
        1.0,
        gt=0,
        le=1024,
        description="LoRA+ (Hayou et al., 2024): B learns this many times faster than A "
        "(unipeft.param_groups and the Trainer apply it; 16 is the paper's usual choice)",
    )


def low_rank_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rank-stabilised scaling."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def low_rank_factors(
    shape: ProjectionShape, r: int, init: str = "kaiming"
) -> tuple[nn.Parameter, nn.Parameter]:
    """``A`` ``(r, in, *kernel)`` initialised by ``init`` (kaiming, gaussian or orthogonal)
    and ``B`` ``(out, r)`` at zero, so ``B A = 0``."""
    a = nn.Parameter(torch.empty(r, shape.in_features, *shape.kernel_size))
    if init == "kaiming":
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    elif init == "gaussian":
        nn.init.normal_(a, std=1.0 / r)
    elif init == "orthogonal":
        nn.init.orthogonal_(a.view(r, -1))
    else:
        raise ValueError(f"unknown init {init!r}: use kaiming, gaussian or orthogonal")
    return a, nn.Parameter(torch.zeros(shape.out_features, r))


def low_rank_parameters(r: int, site: Site) -> int:
    """``r · (d_in · k + d_out)``: the size of ``A`` and ``B`` at a projection site."""
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    return r * (shape.in_features * math.prod(shape.kernel_size) + shape.out_features)


def low_rank_refusal(field: str, r: int, site: Site) -> str | None:
    """Why a rank ``r`` (the config field ``field``) does not fit the projection ``site``, or
    ``None``: ``B A`` has rank ``min(d_in · k, d_out)`` at most, so a larger ``r`` only adds
    parameters that cannot change the update. Sites without a weight are not checked.
    Methods built on :class:`LowRankDelta` use it as their ``size_check``."""
    if getattr(site, "weight", None) is None:
        return None
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    d_in = shape.in_features * math.prod(shape.kernel_size)
    full = min(d_in, shape.out_features)
    if r <= full:
        return None
    return (
        f"{field}={r} is above the largest rank an update of this {d_in}->"
        f"{shape.out_features} projection can have ({full}); a larger rank only adds "
        f"parameters. Choose {field} <= {full}"
    )


def add_low_rank(
    y: Tensor, h: Tensor, B: Tensor, scaling: float, *, inplace: bool = False
) -> Tensor:
    """``y + scaling · h B^T`` as one fused multiply-add (``addmm``).

    ``h`` is ``(..., r)``, ``B`` ``(out, r)``, ``y`` ``(..., out)``. ``inplace`` writes into
    ``y`` (and returns it) when ``y`` can be viewed as a matrix; only for callers that own
    ``y`` and need no gradient through it. Autograd's ``addmm`` keeps only ``h`` and ``B``
    for backward and folds ``scaling`` into the small matmuls.
    """
    out_features = y.shape[-1]
    h2 = h.reshape(-1, h.shape[-1]).to(y.dtype)
    bt = B.to(y.dtype).t()
    if inplace:
        try:
            y2 = y.view(-1, out_features)
        except RuntimeError:  # not viewable as a matrix without a copy
            y2 = None
        if y2 is not None:
            y2.addmm_(h2, bt, alpha=scaling)
            return y
    return torch.addmm(y.reshape(-1, out_features), h2, bt, alpha=scaling).view(y.shape)


class LowRankDelta(ReparameterizedDelta):
    """``y + s · B A dropout(x)`` on a Linear-like or convolution projection.

    Parameters ``A`` ``(r, in, *kernel)`` and ``B`` ``(out, r)``; ``s`` is
    :func:`low_rank_scaling`. On a convolution ``A`` is a convolution with the site's
    kernel, stride and padding and ``B`` a 1×1 convolution. ``self.shape`` is the site's
    :class:`ProjectionShape`.
    """

    def __init__(
        self,
        shape: ProjectionShape,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        lr_ratio: float = 1.0,
    ) -> None:
        super().__init__(shape)
        self.r = r
        self.lr_ratio = lr_ratio
        self.scaling = low_rank_scaling(alpha, r, use_rslora)
        self.A, self.B = low_rank_factors(shape, r, init)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def from_config(cls, config: LowRankConfig, shape: ProjectionShape) -> LowRankDelta:
        return cls(
            shape, config.r, config.alpha, config.dropout, config.use_rslora, config.init,
            config.loraplus_lr_ratio,
        )  # fmt: skip

    def lr_scale(self) -> dict[str, float]:
        """LoRA+: ``B`` at ``lr_ratio`` times the learning rate of ``A``."""
        return {"B": self.lr_ratio} if self.lr_ratio != 1.0 else {}

    @property
    def drops(self) -> bool:
        """Whether dropout is active now (training with a non-zero rate)."""
        return self.training and isinstance(self.dropout, nn.Dropout)

    def delta_weight(self) -> Tensor:
        w = self.B @ self.A.reshape(self.r, -1)
        return (w * self.scaling).reshape(self.shape.out_features, *self.A.shape[1:])

    def down(self, x: Tensor) -> Tensor:
        """``dropout(x) A^T`` ``(..., r)`` (Linear layouts)."""
        h = self.dropout(x)
        return F.linear(h, self.A.to(h.dtype))

    def conv_update(self, x: Tensor) -> Tensor:
        """``s · B * (A * dropout(x))`` on a convolution site, ``(N, out, *spatial)``."""
        h = self.shape.project(self.dropout(x), self.A.to(x.dtype))
        k = len(self.shape.kernel_size)
        b = self.B.to(h.dtype).reshape(*self.B.shape, *([1] * k))
        return (F.conv1d, F.conv2d, F.conv3d)[k - 1](h, b) * self.scaling

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        if self.shape.is_conv:
            return y + self.conv_update(x)
        return add_low_rank(y, self.down(x), self.B, self.scaling)
