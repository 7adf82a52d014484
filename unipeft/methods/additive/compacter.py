"""Compacter: a serial bottleneck adapter whose two projections are low-rank parameterized
hypercomplex multiplication (PHM) layers with "slow" matrices shared by every layer
(Mahabadi, Henderson & Ruder, 2021).

At a sublayer whose output ``y`` has ``d`` features, with bottleneck width ``k`` and
``n = phm_dim``:

    y' = y + up(act(down(y)))
    down(h) = h W_downᵀ + b_down      W_down = Σ_{i=1..n} A_i ⊗ (s_i t_iᵀ)     (k × d)
    up(h)   = h W_upᵀ + b_up          W_up   = Σ_{i=1..n} A_i ⊗ (s'_i t'_iᵀ)   (d × k)

``A_i`` are ``n × n``; the "fast" matrices ``B_i = s_i t_iᵀ`` of each projection are
``(out/n) × (in/n)`` of rank ``phm_rank``. Initialisation: ``s``, ``t`` Glorot-uniform with
gain √2 as in the paper's code, except the up projection's ``s'``, which starts at zero (and
both biases), so that the adapter starts as the identity (the paper's code starts near it);
``A`` normal with standard deviation ``1/sqrt(n)``, so that ``W`` has the scale of ``B``
(the paper's code draws ``A`` with a small standard deviation, ``phm_init_range``, which
shrinks the gradients of the other factors, all multiplied by ``A``, by as much).

Paper: Mahabadi, Henderson, Ruder, *Compacter: Efficient Low-Rank Hypercomplex Adapter
Layers*, NeurIPS 2021, arXiv:2106.04647. ``placement="compacter"`` puts an adapter after the
attention and after the feed-forward sublayer of every block (Houlsby's placement, the
paper's Compacter); ``"compacter++"`` after the feed-forward sublayer only (the paper's
Compacter++).

**Shared across sites:** the slow matrices ``A`` ``(n, n, n)`` are trained parameters of the
adapter's shared module, built once per adapter and used by the down and the up projection of
every layer, as in the paper (``n³`` parameters in all).

PEFT equivalent: none (Hugging Face PEFT has no Compacter; AdapterHub's ``adapters`` has
``CompacterConfig`` / ``CompacterPlusPlusConfig``, whose ``phm_dim``, ``phm_rank`` and
``reduction_factor`` (``d / bottleneck``) are these fields).

Sites: module sites (a sublayer's output: ``attn``, ``mlp``, ``block``, or a projection's
output). Refused: a site whose width is unknown, and, as a size that does not fit
(``ConfigError``), a site whose width ``phm_dim`` does not divide (``A_i ⊗ B_i`` covers the
width in ``n`` equal parts). ``bottleneck`` must be a multiple of ``phm_dim`` too (checked
with the config).

Budget: ``unipeft.plan_budget`` searches ``phm_rank`` (the parameter count grows with it by
``2 · (d + k)`` per site); ``bottleneck`` cannot be searched freely, as it must stay a
multiple of ``phm_dim``: fix it with the other fields.
"""

from __future__ import annotations

import math
from typing import Literal, Self

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import AdditiveDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
_PLACEMENT_TARGETS = {"compacter": ("attn", "mlp"), "compacter++": ("mlp",)}


class CompacterConfig(DeltaConfig):
    """Compacter's fields (the paper's n = 4, rank 1)."""

    bottleneck: int = Field(
        16, ge=1, le=65536, description="width k of the bottleneck, a multiple of phm_dim"
    )
    phm_dim: int = Field(
        4,
        ge=1,
        le=32,
        description="n: Kronecker terms A_i ⊗ B_i per projection; A_i is n × n; must divide "
        "bottleneck and every site's width",
    )
    phm_rank: int = Field(1, ge=1, le=4096, description="rank of each fast matrix B_i = s_i t_iᵀ")
    placement: Literal["compacter", "compacter++"] = Field(
        "compacter",
        description="compacter: after attention and after the MLP of every block; "
        "compacter++: after the MLP only",
    )
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field(
        "gelu", description="nonlinearity between the down and up projections"
    )

    @model_validator(mode="after")
    def _bottleneck_splits(self) -> Self:
        if self.bottleneck % self.phm_dim:
            raise ValueError(
                f"bottleneck={self.bottleneck} must be a multiple of phm_dim={self.phm_dim} "
                "(each A_i ⊗ B_i covers the bottleneck in phm_dim equal parts)"
            )
        return self


def _glorot(shape: tuple[int, ...]) -> Tensor:
    """Glorot-uniform with gain √2 over the last two dimensions, for each leading index."""
    fan_out, fan_in = shape[-2], shape[-1]
    bound = math.sqrt(2.0) * math.sqrt(6.0 / (fan_in + fan_out))
    return torch.empty(shape).uniform_(-bound, bound)


class PhmRule(nn.Module):
    """The adapter's shared slow matrices ``A`` ``(n, n, n)``: ``A[i]`` is ``A_i``, normal
    with standard deviation ``1/sqrt(n)`` (so that ``Σ_i A_i ⊗ B_i`` has the scale of ``B``)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(n, n, n) / math.sqrt(n))


class PhmLinear(nn.Module):
    """``h Wᵀ + b`` with ``W = Σ_i A_i ⊗ (s_i t_iᵀ)`` ``(out, in)``; ``A`` comes with the
    call (the shared rule). ``s`` ``(n, out/n, rank)``, ``t`` ``(n, in/n, rank)``."""

    def __init__(
        self, in_features: int, out_features: int, n: int, rank: int, zero: bool = False
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.n = in_features, out_features, n
        s_shape = (n, out_features // n, rank)
        self.s = nn.Parameter(torch.zeros(s_shape) if zero else _glorot(s_shape))
        self.t = nn.Parameter(_glorot((n, in_features // n, rank)))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def weight(self, rule: Tensor) -> Tensor:
        """``Σ_i A_i ⊗ B_i`` as an ``(out, in)`` matrix."""
        fast = self.s @ self.t.transpose(1, 2)  # B_i: (n, out/n, in/n)
        kron = torch.einsum("iab,icd->acbd", rule, fast)  # (n, out/n, n, in/n)
        return kron.reshape(self.out_features, self.in_features)

    def forward(self, h: Tensor, rule: Tensor) -> Tensor:
        return F.linear(h, self.weight(rule.to(h.dtype)).to(h.dtype), self.bias.to(h.dtype))


class CompacterDelta(AdditiveDelta):
    """``y + up(act(down(y)))``, both projections PHM layers on the adapter's
    shared rule ``A`` (read through :attr:`shared`)."""

    def __init__(
        self,
        features: int,
        shared: PhmRule,
        bottleneck: int,
        *,
        phm_dim: int,
        phm_rank: int,
        activation: str = "gelu",
        channel_dim: int = -1,
    ) -> None:
        super().__init__("serial", 1.0, channel_dim)
        self.use_shared(shared)
        self.down = PhmLinear(features, bottleneck, phm_dim, phm_rank)
        self.act = _ACTIVATIONS[activation]()
        self.up = PhmLinear(bottleneck, features, phm_dim, phm_rank, zero=True)

    def transform(self, h: Tensor) -> Tensor:
        rule = self.shared.A
        return self.up(self.act(self.down(h, rule)), rule)


def _shared(cfg: CompacterConfig, sites: tuple[Site, ...]) -> PhmRule:
    """The slow matrices A (phm_dim × phm_dim × phm_dim), shared by every layer."""
    return PhmRule(cfg.phm_dim)


def _build(cfg: CompacterConfig, site: Site, shared: PhmRule) -> CompacterDelta:
    assert isinstance(site, ModuleSite)
    return CompacterDelta(
        site.features,
        shared,
        cfg.bottleneck,
        phm_dim=cfg.phm_dim,
        phm_rank=cfg.phm_rank,
        activation=cfg.activation,
        channel_dim=site.channel_dim,
    )


def _count(cfg: CompacterConfig, site: Site) -> int:
    assert isinstance(site, ModuleSite)
    d, k = site.features, cfg.bottleneck
    return 2 * cfg.phm_rank * (d + k) + d + k


def _accepts(cfg: CompacterConfig, site: Site) -> str | None:
    if isinstance(site, ModuleSite) and site.features <= 0:
        return (
            f"the width of {site.name!r}'s output is unknown; Compacter adds a bottleneck "
            "adapter to a sublayer's output: target attn or mlp"
        )
    return None


def _size_check(cfg: CompacterConfig, site: Site) -> str | None:
    if isinstance(site, ModuleSite) and site.features > 0 and site.features % cfg.phm_dim:
        divisors = [n for n in range(1, min(site.features, 32) + 1) if site.features % n == 0]
        return (
            f"phm_dim={cfg.phm_dim} must divide the width of every site, and {site.name!r} "
            f"has {site.features} features; choose phm_dim among {divisors}"
        )
    return None


METHOD = Method(
    id="compacter",
    family="additive",
    config=CompacterConfig,
    build=_build,  # type: ignore[arg-type]
    num_parameters=_count,
    formula="2 · phm_rank · (d + k) + d + k per site (the fast factors s, t and the biases "
    "of the down and up PHM layers; d: the site's width, k: bottleneck), plus phm_dim³ "
    "shared by the adapter (the slow matrices A)",
    site_kinds=("module",),
    accepts=_accepts,
    size_check=_size_check,
    refuses="sites of unknown width, and (as a size that does not fit) sites whose width "
    "phm_dim does not divide",
    default_targets=lambda cfg: _PLACEMENT_TARGETS[cfg.placement],
    budget_field="phm_rank",
    mergeable=False,
    identity_at_init=True,
    shared=_shared,
    shared_parameters=lambda cfg, sites: cfg.phm_dim**3,
    paper="Mahabadi, Henderson, Ruder, Compacter: Efficient Low-Rank Hypercomplex Adapter "
    "Layers, NeurIPS 2021, arXiv:2106.04647",
    summary="bottleneck adapter whose projections are sums of Kronecker products of shared "
    "n × n slow matrices and per-layer rank-1 fast matrices",
)

__all__ = ["METHOD", "CompacterConfig", "CompacterDelta", "PhmLinear", "PhmRule"]
