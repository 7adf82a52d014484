"""RoAd: 2-D rotations (with scales) of pairs of a projection's output features.

Liao et al., 2024. The output features are cut into groups of ``group_size``; inside a
group, feature ``p`` of the first half is paired with feature ``p + group_size/2`` of the
second half, and each pair is rotated and scaled:

    y'_p       = a_p · y_p       - b_p · y_{p+h}          (p < h = group_size / 2)
    y'_{p+h}   = a_{p+h} · y_{p+h} + b_{p+h} · y_p
    a = α ⊙ cos θ,  b = α ⊙ sin θ  (road_4: a = α₁ ⊙ cos θ₁, b = α₂ ⊙ sin θ₂)

i.e. ``y' = R y`` with ``R`` block-sparse, applied to the whole output, bias included, so
``W' = R W`` and ``b' = R b``: mergeable, and no base weight is needed to run it. The
variants differ in how many angles and scales they learn per pair: ``road_1`` one angle
and one scale per pair (``d_out / 2`` each; both features of a pair share them), ``road_2``
one per feature (``d_out`` each), ``road_4`` separate ones for ``a`` and ``b``
(``2 · d_out`` each). At the default init (θ = 0, α = 1) ``R = I``: the adapter starts as
the identity. ``R`` is not orthogonal once the scales move; merging needs no inverse,
because the merge ledger restores the weights' bits on unmerge.

Nothing is shared across sites.

PEFT equivalent: ``peft_type="ROAD"``: ``variant`` and ``group_size`` map by name,
``init_weights`` True/False -> ``init`` "identity"/"random"; the tensors ``road_theta`` and
``road_alpha`` are this delta's ``theta`` and ``alpha`` with the same flat shapes. PEFT's
special mixed-batch path is not needed here: unipeft runs each adapter of a mixed batch
on its own samples. PEFT adapts ``nn.Linear`` only.

Sites: Linear, GPT-2 ``Conv1D`` and slices of fused projections (timm's ``qkv``, GPT-2's
``c_attn``, ``nn.MultiheadAttention``'s ``in_proj_weight``), where ``group_size`` must
divide the slice's width. Convolutions are refused (PEFT's RoAd does not adapt them
either); sites without a weight are refused by ``site_kinds``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import ProjectionShape, ReparameterizedDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site

Variant = Literal["road_1", "road_2", "road_4"]
_SIZE = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # angles (and scales) per output feature


class RoadConfig(DeltaConfig):
    variant: Variant = Field(
        "road_1",
        description="road_1: one angle and scale per feature pair; road_2: one per feature; "
        "road_4: separate angles and scales for the cosine and sine terms of each feature",
    )
    group_size: int = Field(
        64,
        ge=2,
        le=65536,
        multiple_of=2,
        description="features per rotation group (even; must divide each site's output "
        "width): feature p of a group is paired with feature p + group_size/2",
    )
    init: Literal["identity", "random"] = Field(
        "identity",
        description="identity: angles 0 and scales 1, so the adapter starts as the identity; "
        "random: angles ~ N(0, 0.5²), scales ~ N(1, 0.5²)",
    )


def _count_per_tensor(variant: str, features: int) -> int:
    return int(features * _SIZE[variant])


class RoadDelta(ReparameterizedDelta):
    """``y' = R y`` along the output features. ``theta`` and ``alpha``: ``(d_out / 2,)``,
    ``(d_out,)`` or ``(2 · d_out,)`` for road_1, road_2, road_4 (PEFT's flat layouts)."""

    def __init__(self, site: ModuleSite, variant: str, group_size: int, init: str) -> None:
        super().__init__(ProjectionShape.of(site))
        self.site = site  # a plain attribute, for delta_weight()
        self.variant = variant
        self.group_size = group_size
        self.channel_dim = site.channel_dim
        n = _count_per_tensor(variant, self.shape.out_features)
        if init == "identity":
            theta, alpha = torch.zeros(n), torch.ones(n)
        else:
            theta, alpha = torch.randn(n) * 0.5, torch.randn(n) * 0.5 + 1.0
        self.theta = nn.Parameter(theta)
        self.alpha = nn.Parameter(alpha)

    # ------------------------------------------------------------------ the rotation

    def coefficients(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(a, b)``, each ``(groups, 2, h)``: ``y' = a ⊙ y + b ⊙ rot(y)`` per group, where
        ``rot`` maps the halves ``(y₁, y₂)`` of a group to ``(-y₂, y₁)``."""
        h = self.group_size // 2
        theta, alpha = self.theta.to(dtype), self.alpha.to(dtype)
        if self.variant == "road_1":  # one value per pair, shared by both halves
            theta = theta.reshape(-1, 1, h).expand(-1, 2, h)
            alpha = alpha.reshape(-1, 1, h).expand(-1, 2, h)
            return alpha * theta.cos(), alpha * theta.sin()
        if self.variant == "road_2":
            theta, alpha = theta.reshape(-1, 2, h), alpha.reshape(-1, 2, h)
            return alpha * theta.cos(), alpha * theta.sin()
        theta = theta.reshape(-1, 2, self.group_size)  # (groups, [cos, sin], group_size)
        alpha = alpha.reshape(-1, 2, self.group_size)
        a = alpha[:, 0] * theta[:, 0].cos()
        b = alpha[:, 1] * theta[:, 1].sin()
        return a.reshape(-1, 2, h), b.reshape(-1, 2, h)

    def rotate(self, v: Tensor) -> Tensor:
        """``R v`` along the last dimension of ``v`` (``d_out`` features)."""
        dtype = torch.promote_types(v.dtype, self.theta.dtype)
        a, b = self.coefficients(dtype)
        h = self.group_size // 2
        g = v.to(dtype).reshape(*v.shape[:-1], -1, 2, h)
        turned = torch.stack((-g[..., 1, :], g[..., 0, :]), dim=-2)
        return (g * a + turned * b).reshape(v.shape)

    # ------------------------------------------------------------------ forward / merge

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        dim = self.channel_dim % y.ndim
        if dim == y.ndim - 1:
            return self.rotate(y).to(y.dtype)
        return self.rotate(y.movedim(dim, -1)).movedim(-1, dim).to(y.dtype)

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(R W, R b)``."""
        with torch.no_grad():
            w = self.rotate(weight.reshape(weight.shape[0], -1).t()).t()
            b = None if bias is None else self.rotate(bias).to(bias.dtype)
        return w.reshape(weight.shape).to(weight.dtype), b

    def delta_weight(self) -> Tensor:
        """``R W - W`` for the site's current weight (read it while not merged)."""
        weight, _ = self.site.weight_views()
        with torch.no_grad():
            w = weight.reshape(weight.shape[0], -1)
            d = self.rotate(w.t()).t() - w.to(self.theta.dtype)
        return d.reshape(weight.shape).to(self.theta.dtype)

    def delta_bias(self) -> Tensor | None:
        """``R b - b`` for the site's bias (None without one)."""
        _, bias = self.site.weight_views()
        if bias is None:
            return None
        with torch.no_grad():
            return (self.rotate(bias) - bias.to(self.theta.dtype)).to(self.theta.dtype)


def _build(cfg: RoadConfig, site: Site) -> RoadDelta:
    assert isinstance(site, ModuleSite)
    return RoadDelta(site, cfg.variant, cfg.group_size, cfg.init)


def _count(cfg: RoadConfig, site: Site) -> int:
    assert isinstance(site, ModuleSite)
    return 2 * _count_per_tensor(cfg.variant, site.features)


def _accepts(cfg: RoadConfig, site: Site) -> str | None:
    if isinstance(site, ModuleSite) and site.weight is not None and site.weight.layout == "conv":
        return (
            f"{site.name!r} is a convolution; RoAd rotates the output features of Linear-like "
            "projections only (as PEFT's RoAd does). Target Linear / Conv1D projections or "
            "fused q/k/v slices instead (e.g. attn.q, attn.v, mlp.up)"
        )
    return None


def _size_check(cfg: RoadConfig, site: Site) -> str | None:
    if not isinstance(site, ModuleSite) or site.weight is None:
        return None
    n = site.features
    if n % cfg.group_size == 0:
        return None
    evens = [g for g in range(2, min(n, 64) + 1, 2) if n % g == 0]
    hint = f" (e.g. {evens[-1]})" if evens else ""
    return (
        f"group_size={cfg.group_size} does not divide the {n} output features of this "
        f"projection, so they cannot be cut into rotation groups. Choose an even group_size "
        f"that divides {n}{hint}"
    )


METHOD = Method(
    id="road",
    refuses="convolutions; a group_size that does not divide a site's output width",
    family="reparameterized",
    config=RoadConfig,
    build=_build,
    num_parameters=_count,
    formula="2 · s · d_out per projection, s = 1/2, 1, 2 for road_1, road_2, road_4 "
    "(angles and scales)",
    site_kinds=("projection",),
    default_targets=("attn.q", "attn.v"),
    mergeable=True,
    identity_at_init=lambda cfg: cfg.init == "identity",
    paper="Liao et al., 2D Rotary Adaptation for Efficient Parameter-Efficient Fine-Tuning, "
    "Batching, and Interpretability (RoAd), 2024, arXiv:2409.00119",
    summary="scaled 2-D rotations of pairs of output features (bias included); mergeable",
    accepts=_accepts,
    size_check=_size_check,
)
