"""VeRA: one pair of frozen random projections for the whole adapter, two trained vectors per
projection (Kopiczko et al., 2024).

Every adapted projection ``i`` (``d_in -> d_out``) gets

    ΔW_i = diag(λ_b,i) · B[:d_out] · diag(λ_d,i) · A[:, :d_in]
    y'   = y + λ_b,i ⊙ (B[:d_out] (λ_d,i ⊙ (A[:, :d_in] dropout(x))))

**Shared across sites:** ``A`` ``(r, max d_in)`` and ``B`` ``(max d_out, r)`` are built once
per adapter (sized by the widest input and output among its sites), frozen, and each site
uses their leading rows/columns. They are drawn from a CPU generator seeded with
``projection_seed`` (Kaiming-uniform, fan-in of each matrix), exactly as PEFT draws them
from ``projection_prng_key``, so the same seed rebuilds the same projections. They are
persistent buffers: unipeft saves them once with the adapter, and loading relies on that.

Trainable per site: ``λ_d`` ``(r,)``, initialised to ``d_initial``, and ``λ_b``
``(d_out,)``, initialised to zero, so the adapter starts as the identity.

PEFT equivalent: ``peft_type="VERA"``; ``r`` -> ``r``, ``d_initial`` -> ``d_initial``,
``dropout`` -> ``vera_dropout``, ``projection_seed`` -> ``projection_prng_key``,
``save_projection`` -> ``save_projection`` (only what a PEFT export writes: unipeft's own
files always hold the projections). PEFT's per-module ``vera_lambda_b`` / ``vera_lambda_d``
are ``λ_b`` / ``λ_d``; its ``base_model.vera_A`` / ``base_model.vera_B`` are ``A`` / ``B``.

Sites: every Linear-like projection (nn.Linear, GPT-2 ``Conv1D``, fused q/k/v slices,
``nn.MultiheadAttention`` in_proj slices). Convolutions are refused: a shared ``(r, d_in)``
projection has no kernel dimension, and PEFT's VeRA does not adapt them either.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import ProjectionShape, ReparameterizedDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site


class VeraConfig(DeltaConfig):
    """VeRA's fields (PEFT's defaults)."""

    r: int = Field(
        256,
        ge=1,
        le=65536,
        description="rank of the shared random projections A (r × d_in) and B (d_out × r)",
    )
    d_initial: float = Field(
        0.1, gt=0.0, le=1e3, description="initial value of every entry of the vectors λ_d"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of A")
    projection_seed: int = Field(
        0,
        ge=0,
        le=2**63 - 1,
        description="seed of the frozen random projections A and B (PEFT's projection_prng_key)",
    )
    save_projection: bool = Field(
        True,
        description="whether a PEFT export writes A and B (PEFT's save_projection); unipeft's "
        "own save always stores them",
    )


def kaiming_uniform(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """A float32 tensor drawn uniformly in ``±sqrt(6 / fan_in)`` (``fan_in``: the size of the
    last dimension), from ``generator``: the draw PEFT uses for VeRA's projections."""
    fan_in = shape[-1]
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan_in)) if fan_in else 0.0
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The adapter's frozen ``A`` ``(r, in_features)`` and ``B`` ``(out_features, r)``
    (persistent buffers), drawn from ``seed``."""

    def __init__(self, r: int, in_features: int, out_features: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("A", kaiming_uniform((r, in_features), gen))
        self.register_buffer("B", kaiming_uniform((out_features, r), gen))


class VeraDelta(ReparameterizedDelta):
    """``y + λ_b ⊙ (B' (λ_d ⊙ (A' dropout(x))))`` with ``A'``, ``B'`` the leading part of the
    adapter's shared projections (read through :attr:`shared`)."""

    def __init__(
        self,
        shape: ProjectionShape,
        shared: VeraProjections,
        r: int,
        d_initial: float = 0.1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(shape)
        self.use_shared(shared)
        self.r = r
        self.lambda_d = nn.Parameter(torch.full((r,), float(d_initial)))
        self.lambda_b = nn.Parameter(torch.zeros(shape.out_features))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def projections(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """This site's ``A'`` ``(r, in)`` and ``B'`` ``(out, r)`` in ``like``'s dtype."""
        a = self.shared.A[:, : self.shape.in_features]
        b = self.shared.B[: self.shape.out_features]
        return a.to(like.dtype), b.to(like.dtype)

    def delta_weight(self) -> Tensor:
        a, b = self.projections(self.lambda_b)
        return (self.lambda_b[:, None] * b) @ (self.lambda_d[:, None] * a)

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        a, b = self.projections(x)
        h = F.linear(self.dropout(x), a) * self.lambda_d.to(x.dtype)
        return y + (F.linear(h, b) * self.lambda_b.to(x.dtype)).to(y.dtype)


def linear_sites(sites: tuple[Site, ...]) -> list[ModuleSite]:
    """The Linear-like projection sites among ``sites`` (the ones these methods adapt)."""
    return [
        s
        for s in sites
        if isinstance(s, ModuleSite) and s.weight is not None and s.weight.layout != "conv"
    ]


def refuse_convolutions(method: str, site: Site) -> str | None:
    """Why ``method`` cannot adapt ``site`` when it is a convolution, else None."""
    if isinstance(site, ModuleSite) and site.weight is not None and site.weight.layout == "conv":
        return (
            f"{method} adapts Linear-like projections (nn.Linear, GPT-2 Conv1D, fused q/k/v "
            f"slices, nn.MultiheadAttention in_proj slices), and {site.name!r} is a "
            "convolution: the adapter's shared random projections have no kernel dimension "
            "(PEFT refuses convolutions too). Target the attention or MLP projections "
            "instead (e.g. attn.q, attn.v, mlp.up)"
        )
    return None


def _shared(cfg: VeraConfig, sites: tuple[Site, ...]) -> VeraProjections:
    used = linear_sites(sites)
    d_in = max((s.weight.in_features for s in used if s.weight is not None), default=0)
    d_out = max((s.features for s in used), default=0)
    return VeraProjections(cfg.r, d_in, d_out, cfg.projection_seed)


def _build(cfg: VeraConfig, site: Site, shared: VeraProjections) -> VeraDelta:
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    return VeraDelta(shape, shared, cfg.r, cfg.d_initial, cfg.dropout)


def _count(cfg: VeraConfig, site: Site) -> int:
    return cfg.r + ProjectionShape.of(site).out_features  # type: ignore[arg-type]


def _accepts(cfg: VeraConfig, site: Site) -> str | None:
    return refuse_convolutions("VeRA", site)


METHOD = Method(
    id="vera",
    refuses="convolutions (PEFT's VeRA adapts linear layers only); every other projection is taken",
    family="reparameterized",
    config=VeraConfig,
    build=_build,  # type: ignore[arg-type]
    num_parameters=_count,
    formula="r + d_out per projection (the shared random A and B are frozen buffers)",
    site_kinds=("projection",),
    accepts=_accepts,
    default_targets=("attn.q", "attn.v"),
    budget_field="r",
    mergeable=True,
    identity_at_init=True,
    shared=_shared,
    paper="Kopiczko, Blankevoort, Asano, VeRA: Vector-based Random Matrix Adaptation, 2024, "
    "arXiv:2310.11454",
    summary="frozen random low-rank projections shared by all sites, scaled by two trained "
    "vectors per projection; mergeable",
)
