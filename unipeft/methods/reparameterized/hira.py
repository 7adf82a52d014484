"""HiRA: a high-rank update, the frozen weight modulated element-wise by a low-rank matrix.

Huang et al., *HiRA: Parameter-Efficient Hadamard High-Rank Adaptation of Large Language
Models*, ICLR 2025 (openreview.net/forum?id=TwJrTz9cRS). The update is the Hadamard product
of the frozen weight ``W`` with ``B A``:

    ΔW = W ⊙ (B A)          y' = y + (W ⊙ B A) dropout(x)

so ``ΔW`` can have a rank far above ``r`` (up to ``rank(W) · r``). ``A`` ``(r, d_in,
*kernel)`` is kaiming-uniform (or gaussian with std ``1/r``), ``B`` ``(d_out, r)`` starts
at zero, so the adapter starts as the identity. There is no scale.

``W`` is the site's weight as it is stored, read through
:meth:`~unipeft.ModuleSite.weight_views` at every call (restricted to the site's rows of a
fused projection; the site is a plain attribute, nothing of it is saved). ``merge()`` folds
``W ⊙ B A`` of the weight it is given, so merged and unmerged outputs agree; when another
adapter is merged into the same weight first, HiRA's ``W`` includes it (as DoRA's norm does),
and two HiRA adapters running unmerged at one site each modulate the stored weight. Nothing
is shared across sites.

PEFT equivalent: ``peft_type="HIRA"``; ``r`` -> ``r``, ``dropout`` -> ``hira_dropout``,
``init`` -> ``init_weights`` (``True`` or ``"gaussian"``); tensors ``hira_A`` = ``A``,
``hira_B`` = ``B`` (``(d_out, r, 1, ...)`` on a convolution).

Sites: every projection layout: Linear, GPT-2 ``Conv1D``, convolutions (``A`` keeps the
kernel, ``B A`` is ``(d_out, d_in, *kernel)`` as the weight), slices of fused projections
and the ``in_proj`` slices of ``nn.MultiheadAttention``. Nothing is refused.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ...blocks import LowRankDelta, low_rank_parameters, low_rank_refusal
from ...contract.config import DeltaConfig
from ...contract.deltas import ProjectionShape
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site


class HiraConfig(DeltaConfig):
    r: int = Field(8, ge=1, le=4096, description="rank of the modulation B A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of the update")
    init: Literal["kaiming", "gaussian"] = Field(
        "kaiming",
        description="init of A (kaiming-uniform, or gaussian with std 1/r); B starts at zero, "
        "so the adapter is the identity at init",
    )


class HiraDelta(LowRankDelta):
    """``y + (W ⊙ B A) dropout(x)``. ``A``: ``(r, in, *kernel)``, ``B``: ``(out, r)``; ``W``
    is read from the site at every call."""

    def __init__(self, site: ModuleSite, r: int, dropout: float = 0.0, init: str = "kaiming"):
        super().__init__(ProjectionShape.of(site), r, float(r), dropout, False, init)
        self.site = site  # not a module, parameter or buffer: nothing of it is saved
        weight, _ = site.weight_views()
        expected = (self.shape.out_features, self.shape.in_features, *self.shape.kernel_size)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"site {site.name!r}: its weight is {tuple(weight.shape)}, expected {expected}"
            )

    def modulation(self) -> Tensor:
        """``B A`` ``(out, in, *kernel)``: what multiplies the weight element-wise."""
        return LowRankDelta.delta_weight(self)  # the scale is alpha / r = 1

    def _adapted(self, weight: Tensor) -> Tensor:
        return weight * self.modulation().to(weight.dtype)

    def delta_weight(self) -> Tensor:
        """``W ⊙ B A`` for the site's weight as stored now. Read it while the adapter is not
        merged: merged, the weight already holds ``W + W ⊙ B A``."""
        weight, _ = self.site.weight_views()
        return self._adapted(weight).to(self.A.dtype)

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        weight, _ = self.site.weight_views()
        update = self.shape.project(self.dropout(x), self._adapted(weight).to(x.dtype))
        return y + update.to(y.dtype)

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(W + W ⊙ B A, b)`` for the ``weight`` given."""
        with torch.no_grad():
            return weight + self._adapted(weight), bias


def _build(cfg: HiraConfig, site: Site) -> HiraDelta:
    assert isinstance(site, ModuleSite)
    return HiraDelta(site, cfg.r, cfg.dropout, cfg.init)


def _count(cfg: HiraConfig, site: Site) -> int:
    return low_rank_parameters(cfg.r, site)


def _rank_fits(cfg: HiraConfig, site: Site) -> str | None:
    return low_rank_refusal("r", cfg.r, site)


METHOD = Method(
    id="hira",
    refuses="nothing beyond non-projection sites",
    family="reparameterized",
    config=HiraConfig,
    build=_build,
    num_parameters=_count,
    formula="r · (d_in · k + d_out) per projection (k: kernel elements, 1 for Linear)",
    site_kinds=("projection",),
    default_targets=("attn.q", "attn.v"),
    budget_field="r",
    mergeable=True,
    identity_at_init=True,
    paper="Huang et al., HiRA: Parameter-Efficient Hadamard High-Rank Adaptation of Large "
    "Language Models, ICLR 2025, https://openreview.net/forum?id=TwJrTz9cRS",
    summary="the frozen weight modulated element-wise by a low-rank B A (ΔW = W ⊙ B A, "
    "high rank from r · (d_in + d_out) parameters); mergeable",
    size_check=_rank_fits,
)
