"""RandLoRA: a full-rank update from shared frozen random bases, with trained diagonal scalings
per projection (Albert et al., 2025).

For a projection ``d_in -> d_out`` let ``m = min(d_in, d_out)``, ``M = max(d_in, d_out)`` and
``n = ceil(m / r)`` bases of rank ``r``. With the shared bases ``A`` ``(r, 1, m_max)`` and
``B`` ``(M_max, n_max, r)``:

    Â = (λ[:, :, None] · A[:, :, :m] · γ[None]).reshape(r·n, m)     λ: (r, n), γ: (n, m)
    B̂ = B[:M, :n, :].reshape(M, n·r)
    ΔW = s · B̂ Â            when d_in <= d_out   ((d_out, d_in) = (M, m))
    ΔW = s · (B̂ Â)ᵀ         when d_in > d_out
    y' = y + ΔW dropout(x)  (in factored form)    s = alpha / r

The ``r·n`` rows of ``Â`` and columns of ``B̂`` are flattened in different orders (``(r, n)``
and ``(n, r)``), pairing the bases as PEFT does. The trained scalings always act on the
smaller side ``m``, so ``n · (r + m)`` parameters per projection give a rank up to ``m``.

**Shared across sites:** ``A`` and ``B`` are built once per adapter, sized by the largest
input and output widths among its sites (``m_max = min``, ``M_max = max`` of those two),
frozen, and each site slices them. They are drawn from a CPU generator seeded with
``projection_seed``, the way PEFT draws them from ``projection_prng_key``: ``dense`` bases are
Kaiming-uniform draws made in bfloat16 (``B`` one ``(M_max, 1, r)`` block at a time), and
``sparse`` / ``very_sparse`` ones ternary (``-1, 0, 1`` with probability ``1/(2s)`` for each
sign, ``s = 3`` or ``sqrt(m_max)``); each is divided by its standard deviation. They are
persistent buffers, saved once with the adapter.

Trainable per site: ``λ`` at zero (so the adapter starts as the identity) and ``γ`` at
``1 / max(n, m)``.

PEFT equivalent: ``peft_type="RANDLORA"``; ``r`` -> ``r``, ``alpha`` -> ``randlora_alpha``,
``dropout`` -> ``randlora_dropout``, ``projection_seed`` -> ``projection_prng_key``,
``bases`` -> ``sparse`` / ``very_sparse``, ``save_projection`` -> ``save_projection`` (what a
PEFT export writes; unipeft always saves the bases). PEFT's ``randlora_lambda`` /
``randlora_gamma`` are ``λ`` / ``γ``; ``base_model.randlora_A`` / ``base_model.randlora_B``
are ``A`` / ``B``.

Sites: Linear-like projections (nn.Linear, GPT-2 ``Conv1D``, fused q/k/v slices,
``nn.MultiheadAttention`` in_proj slices); convolutions are refused (PEFT's RandLoRA does
not adapt them, and the bases have no kernel dimension).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import ProjectionShape, ReparameterizedDelta
from ...contract.method import Method
from ...contract.sites import Site
from .vera import linear_sites, refuse_convolutions

Bases = Literal["dense", "sparse", "very_sparse"]


class RandLoraConfig(DeltaConfig):
    """RandLoRA's fields (PEFT's defaults)."""

    r: int = Field(
        32,
        ge=1,
        le=4096,
        description="rank of each random basis; a projection uses ceil(min(d_in, d_out) / r) "
        "of them, so a smaller r means more trained parameters",
    )
    alpha: float = Field(
        640.0, gt=0, le=1e6, description="scale numerator: ΔW is scaled by alpha / r"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of the update")
    projection_seed: int = Field(
        0,
        ge=0,
        le=2**63 - 1,
        description="seed of the frozen random bases A and B (PEFT's projection_prng_key)",
    )
    bases: Bases = Field(
        "dense",
        description="random bases: dense Kaiming-uniform, or ternary sparse (1/3 non-zero) or "
        "very_sparse (2/sqrt(min width) non-zero), as PEFT's sparse / very_sparse",
    )
    save_projection: bool = Field(
        True,
        description="whether a PEFT export writes A and B (PEFT's save_projection); unipeft's "
        "own save always stores them",
    )


def num_bases(min_dim: int, r: int) -> int:
    """``ceil(min_dim / r)``: the bases of rank ``r`` that reach full rank ``min_dim``."""
    return -(-min_dim // r)


def _unit_std(t: Tensor) -> Tensor:
    std = t.std()
    return t / std if bool(std > 0) else t


def dense_bases(
    r: int, min_dim: int, max_dim: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Kaiming-uniform ``A`` ``(r, 1, min_dim)`` and ``B`` ``(max_dim, n, r)`` drawn in
    bfloat16 (``B`` one basis at a time), each divided by its standard deviation."""

    def draw(shape: tuple[int, ...]) -> Tensor:
        t = torch.empty(shape, dtype=torch.bfloat16)
        return nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)

    a = draw((r, 1, min_dim))
    n = num_bases(min_dim, r)
    b = torch.cat([draw((max_dim, 1, r)) for _ in range(n)], dim=1)
    return _unit_std(a).float(), _unit_std(b).float()


def sparse_bases(
    r: int, min_dim: int, max_dim: int, sparsity: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Ternary ``A`` and ``B``: ``-1`` and ``1`` each with probability ``1 / (2·sparsity)``,
    else ``0``, each divided by its standard deviation."""

    def ternary(u: Tensor) -> Tensor:
        t = torch.zeros(u.shape)
        t[u < 1 / (2 * sparsity)] = -1
        t[u > 1 - 1 / (2 * sparsity)] = 1
        return _unit_std(t)

    a = torch.rand((r, 1, min_dim), generator=generator)
    b = torch.rand((max_dim, num_bases(min_dim, r), r), generator=generator)
    return ternary(a), ternary(b)


class RandLoraBases(nn.Module):
    """The adapter's frozen bases ``A`` ``(r, 1, min_dim)`` and ``B`` ``(max_dim, n, r)``
    (persistent buffers), for projections up to ``in_features`` and ``out_features``."""

    def __init__(
        self, r: int, in_features: int, out_features: int, seed: int, bases: Bases = "dense"
    ) -> None:
        super().__init__()
        lo, hi = min(in_features, out_features), max(in_features, out_features)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        if bases == "dense":
            a, b = dense_bases(r, lo, hi, gen)
        else:
            sparsity = 3.0 if bases == "sparse" else math.sqrt(lo)
            a, b = sparse_bases(r, lo, hi, sparsity, gen)
        self.register_buffer("A", a)
        self.register_buffer("B", b)


class RandLoraDelta(ReparameterizedDelta):
    """``y + s · B̂ Â dropout(x)`` (or its transpose, see the module docstring), with the
    scalings ``lam`` ``(r, n)`` and ``gamma`` ``(n, min(d_in, d_out))`` and the adapter's
    shared bases (read through :attr:`shared`)."""

    def __init__(
        self,
        shape: ProjectionShape,
        shared: RandLoraBases,
        r: int,
        alpha: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(shape)
        self.use_shared(shared)
        self.r = r
        self.scaling = alpha / r
        d_in, d_out = shape.in_features, shape.out_features
        self.min_dim, self.max_dim = min(d_in, d_out), max(d_in, d_out)
        self.n = num_bases(self.min_dim, r)
        self.lam = nn.Parameter(torch.zeros(r, self.n))
        self.gamma = nn.Parameter(torch.full((self.n, self.min_dim), 1 / max(self.n, self.min_dim)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def input_is_small(self) -> bool:
        """Whether ``Â`` (the scaled side) acts on the input (``d_in <= d_out``)."""
        return self.shape.in_features <= self.shape.out_features

    def factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``Â`` ``(r·n, m)`` (scaled) and ``B̂`` ``(M, n·r)``, in ``dtype``."""
        a = self.shared.A[:, :, : self.min_dim].to(dtype)
        scaled = self.lam.to(dtype)[:, :, None] * a * self.gamma.to(dtype)[None]
        b = self.shared.B[: self.max_dim, : self.n, :].to(dtype)
        return scaled.reshape(self.r * self.n, self.min_dim), b.reshape(self.max_dim, -1)

    def delta_weight(self) -> Tensor:
        a_hat, b_hat = self.factors(self.lam.dtype)
        w = b_hat @ a_hat
        return (w if self.input_is_small else w.t()) * self.scaling

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        a_hat, b_hat = self.factors(x.dtype)
        h = self.dropout(x)
        if self.input_is_small:
            out = F.linear(F.linear(h, a_hat), b_hat)
        else:
            out = F.linear(F.linear(h, b_hat.t()), a_hat.t())
        return y + (out * self.scaling).to(y.dtype)


def _shared(cfg: RandLoraConfig, sites: tuple[Site, ...]) -> RandLoraBases:
    used = linear_sites(sites)
    d_in = max((s.weight.in_features for s in used if s.weight is not None), default=0)
    d_out = max((s.features for s in used), default=0)
    return RandLoraBases(cfg.r, d_in, d_out, cfg.projection_seed, cfg.bases)


def _build(cfg: RandLoraConfig, site: Site, shared: RandLoraBases) -> RandLoraDelta:
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    return RandLoraDelta(shape, shared, cfg.r, cfg.alpha, cfg.dropout)


def _count(cfg: RandLoraConfig, site: Site) -> int:
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    m = min(shape.in_features, shape.out_features)
    return num_bases(m, cfg.r) * (cfg.r + m)


def _accepts(cfg: RandLoraConfig, site: Site) -> str | None:
    return refuse_convolutions("RandLoRA", site)


METHOD = Method(
    id="randlora",
    refuses="convolutions (PEFT's RandLoRA adapts linear layers only)",
    family="reparameterized",
    config=RandLoraConfig,
    build=_build,  # type: ignore[arg-type]
    num_parameters=_count,
    formula="n · (r + m) per projection, m = min(d_in, d_out), n = ceil(m / r) (the shared "
    "random bases are frozen buffers)",
    site_kinds=("projection",),
    accepts=_accepts,
    default_targets=("attn.q", "attn.v"),
    mergeable=True,
    identity_at_init=True,
    shared=_shared,
    paper="Albert et al., RandLoRA: Full-rank parameter-efficient "
    "fine-tuning of large models, 2025, arXiv:2502.00987",
    summary="full-rank update from frozen random bases shared by all sites, with trained "
    "diagonal scalings per projection; mergeable",
)
