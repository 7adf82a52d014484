"""LoRA: a low-rank update ``ΔW = (α / r) · B A`` of a projection (Hu et al., 2021).

The update itself is :class:`~unipeft.blocks.LowRankDelta`; what this module adds is the
method record and the :class:`~unipeft.contract.fastpath.FastPath` methods, whose kernels
live in :mod:`.fast`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ....blocks import (
    LowRankConfig,
    LowRankDelta,
    add_low_rank,
    low_rank_parameters,
    low_rank_refusal,
)
from ....blocks.fused import lora_linear
from ....contract.deltas import ProjectionShape
from ....contract.method import Method
from ....contract.sites import Site, weight_codec
from . import fast, mixed
from .residual import ResidualLoraDelta


class LoraConfig(LowRankConfig):
    """The low-rank fields; ``init`` also takes the initialisations that start from the
    weight itself (PiSSA, OLoRA: :mod:`.residual`)."""

    init: Literal["kaiming", "gaussian", "orthogonal", "pissa", "olora"] = Field(
        "kaiming",
        description="kaiming / gaussian / orthogonal: init of A with B at zero; pissa / olora: "
        "A and B from the weight's first r singular (PiSSA) or QR (OLoRA) directions, the "
        "residual left in the weight; every one is the identity at init",
    )


class LoraDelta(LowRankDelta):
    """``y + s · B(A(dropout(x)))``. ``A``: ``(r, in, *kernel)``, ``B``: ``(out, r)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shared: fast.SharedDown | None = None  # set by link(); not a submodule

    def down(self, x: Tensor) -> Tensor:
        """``dropout(x) A^T``: ``(..., r)``. Taken from the adapter's shared projection when
        another site read the same ``x`` first (see :class:`fast.SharedDown`)."""
        shared = self._shared
        if (
            shared is not None
            and not self.drops
            and not torch.compiler.is_compiling()  # the compiler fuses on its own
        ):
            return shared.down(self, x)
        return super().down(x)

    # ------------------------------------------------------------------ FastPath
    def update_(self, x: Tensor | None, y: Tensor) -> Tensor:
        if self.shape.is_conv or x is None:
            return self(x, y)
        h = self.down(x)
        grad = torch.is_grad_enabled() and (
            y.requires_grad or h.requires_grad or self.B.requires_grad
        )
        return add_low_rank(y, h, self.B, self.scaling, inplace=not grad)

    def fused_linear(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool
    ) -> Tensor | None:
        """The site's whole output ``x W^T + b + s · x A^T B^T`` in one step. With
        gradients: one autograd node that keeps ``x``, ``x A^T`` and the factors, and
        accumulates the input gradient of the base and of the low-rank path in one buffer.
        Without: the plain kernels, the low-rank part added in place."""
        if self.shape.is_conv or self.drops:
            return None
        if not weight.is_floating_point() or weight_codec(weight) is not None:
            return None  # a quantized weight (torchao...): the layer's own forward runs
        if torch.is_autocast_enabled(x.device.type):
            return None  # autocast picks the dtypes of the matmuls; the hook path follows it
        a, b = self.A, self.B
        if a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        grad = torch.is_grad_enabled() and (
            x.requires_grad or a.requires_grad or b.requires_grad or weight.requires_grad
        )
        if grad:
            return lora_linear(x, weight, bias, a, b, self.scaling, transposed)
        x2 = x.reshape(-1, x.shape[-1])
        wt = weight if transposed else weight.t()
        y = torch.mm(x2, wt) if bias is None else torch.addmm(bias, x2, wt)
        h = self.down(x) if self._shared is not None else F.linear(x, a)
        y.addmm_(h.reshape(-1, self.r), b.t(), alpha=self.scaling)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def update_slices(
        deltas: list, slices: list[tuple[int, int]], x: Tensor, y: Tensor
    ) -> Tensor | None:
        return fast.update_fused_slices(deltas, slices, x, y)

    @staticmethod
    def link(attachments: list) -> None:
        fast.link_shared(attachments)

    @staticmethod
    def mixed(
        deltas: list, x: Tensor | None, y: Tensor, slots: Tensor, cache: dict
    ) -> Tensor | None:
        return mixed.mixed_batch(deltas, x, y, slots, cache)


def _build(cfg: LoraConfig, site: Site) -> LowRankDelta:
    if cfg.init in ("pissa", "olora"):
        return ResidualLoraDelta(
            site,  # type: ignore[arg-type]
            cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.init, cfg.loraplus_lr_ratio,
        )  # fmt: skip
    return LoraDelta.from_config(cfg, ProjectionShape.of(site))  # type: ignore[arg-type]


def _count(cfg: LoraConfig, site: Site) -> int:
    return low_rank_parameters(cfg.r, site)


def _rank_fits(cfg: LoraConfig, site: Site) -> str | None:
    return low_rank_refusal("r", cfg.r, site)


METHOD = Method(
    id="lora",
    refuses="r above min(d_in · k, d_out) of a site",
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
    size_check=_rank_fits,
)
