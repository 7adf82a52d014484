"""LoRA: a low-rank update ``ΔW = (α / r) · B A`` of a projection (Hu et al., 2021)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config import DeltaConfig
from ..delta import ProjectionShape, ReparameterizedDelta
from ..registry import Method
from ..sites import Site


class LoraConfig(DeltaConfig):
    r: int = Field(8, ge=1, le=4096, description="rank of the update")
    alpha: float = Field(16.0, gt=0, description="scale numerator: ΔW is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of A")
    use_rslora: bool = Field(
        False, description="rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski, 2023)"
    )
    init: Literal["kaiming", "gaussian", "orthogonal"] = Field(
        "kaiming",
        description="init of A; B always starts at zero, so the adapter is the identity at init",
    )


class LoraDelta(ReparameterizedDelta):
    """``y + s · B(A(dropout(x)))``. ``A``: ``(r, in, *kernel)``, ``B``: ``(out, r)``."""

    def __init__(
        self,
        shape: ProjectionShape,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
    ) -> None:
        super().__init__(shape)
        self.r = r
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.A = nn.Parameter(torch.empty(r, shape.in_features, *shape.kernel_size))
        self.B = nn.Parameter(torch.zeros(shape.out_features, r))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.A, std=1.0 / r)
        else:
            nn.init.orthogonal_(self.A.view(r, -1))

    def delta_weight(self) -> Tensor:
        w = self.B @ self.A.reshape(self.r, -1)
        return (w * self.scaling).reshape(self.shape.out_features, *self.A.shape[1:])

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        h = self.dropout(x)
        if self.shape.is_conv:
            h = self.shape.project(h, self.A.to(h.dtype))
            b = self.B.to(h.dtype).reshape(*self.B.shape, *([1] * len(self.shape.kernel_size)))
            conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.shape.kernel_size) - 1]
            return y + conv(h, b) * self.scaling
        return y + F.linear(F.linear(h, self.A.to(h.dtype)), self.B.to(h.dtype)) * self.scaling

    @staticmethod
    def mixed(
        deltas: list[LoraDelta], x: Tensor | None, y: Tensor, slots: Tensor, cache: dict
    ) -> Tensor | None:
        """Every adapter's LoRA on its own samples with two batched matmuls.

        Factors are padded to the largest rank and stacked, with a zero slot for samples
        without an adapter here: ``A`` ``(k+1, r, in)``, ``B·s`` ``(k+1, out, r)``; each
        sample gathers its pair. Stacks are reused while no factor changed.
        """
        if x is None or any(d.shape.is_conv for d in deltas):
            return None
        if any(d.training and isinstance(d.dropout, nn.Dropout) for d in deltas):
            return None  # dropout differs per adapter; the per-group path applies each one
        a, b = _stacked(deltas, cache)
        n = x.shape[0]
        h = torch.bmm(x.reshape(n, -1, x.shape[-1]), a.to(x.dtype)[slots].transpose(1, 2))
        out = torch.bmm(h, b.to(x.dtype)[slots].transpose(1, 2))
        return y + out.reshape(y.shape)


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


def _build(cfg: LoraConfig, site: Site) -> LoraDelta:
    return LoraDelta(
        ProjectionShape.of(site), cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.init
    )


def _count(cfg: LoraConfig, site: Site) -> int:
    shape = ProjectionShape.of(site)
    return cfg.r * (shape.in_features * math.prod(shape.kernel_size) + shape.out_features)


METHOD = Method(
    id="lora",
    family="reparameterized",
    config=LoraConfig,
    build=_build,
    num_parameters=_count,
    formula="r · (d_in · k + d_out) per projection (k: kernel elements, 1 for Linear)",
    site_kinds=("projection",),
    default_targets=("attn.q", "attn.v"),
    budget_field="r",
    mergeable=True,
    identity_at_init=True,
    paper="Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, 2021, arXiv:2106.09685",
    summary="low-rank update of projection weights; mergeable",
)
