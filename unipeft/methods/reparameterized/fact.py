"""FacT: every adapted weight of the model as one tensor, factorized with factors shared by all
layers (Jie & Deng, 2023).

The updates of all adapted projections are slices of one tensor of ``d × d`` blocks: a
projection ``d_in -> d_out`` with ``d = min(d_in, d_out)`` dividing ``max(d_in, d_out)`` is
cut into ``n_out × n_in`` square blocks (``n_out = d_out / d``, ``n_in = d_in / d``; the
paper's ``d × 4d`` MLP matrices become four blocks), and block ``(a, b)`` of projection ``m``
is

    ΔW_{m,a,b} = s · U Σ_{m,a,b} Vᵀ                       U, V: (d, r), shared
    FacT-TT (variant="tt"):  Σ_{m,a,b} (r × r) trained per block (the tensor-train core)
    FacT-TK (variant="tk"):  Σ_{m,a,b} = C ×₃ p_{m,a,b}      C: (r, r, r), shared;
                             p_{m,a,b} (r,) trained per block (the Tucker factor's row)
    y' = y + s · U dropout(Σ Vᵀ x)   (in factored form, block by block)

which is the paper's ``ΔW = s · Σ ×₂ U ×₃ V`` (TT) and ``ΔW = s · C ×₁ P ×₂ U ×₃ V`` (TK)
restricted to one slice of the stacked tensor. ``U`` starts at zero (the paper's code zeroes
this output-side factor), so the adapter starts as the identity; ``V`` is uniform in
``±1/sqrt(d)``, ``Σ`` and ``p`` uniform in ``±1/sqrt(r)``, ``C`` Xavier-uniform. The dropout
acts on the ``r``-wide hidden vector, before ``U``, as in the paper's code.

Paper: Jie & Deng, *FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer*,
AAAI 2023, arXiv:2212.03145.

**Shared across sites:** ``U`` and ``V`` (and, for TK, the core ``C``) are trained parameters
of the adapter's shared module, built once per adapter. There is one ``(U, V)`` pair per
tower and block size ``d``: a one-tower model with square attention projections and a
``d × 4d`` MLP has a single pair, as in the paper; open_clip's two towers get one pair each;
Llama's narrower grouped key/value projections (``d_kv × d``) are cut into ``d_kv`` blocks and
share a pair of their own size. The core ``C`` is shared by all of them.

PEFT equivalent: none (Hugging Face PEFT has no FacT).

Sites: Linear-like projections (nn.Linear, GPT-2 ``Conv1D``, fused q/k/v slices,
``nn.MultiheadAttention`` in_proj slices). Refused: convolutions (a ``d × d`` factor has no
kernel dimension) and projections whose larger width is not a multiple of the smaller one
(e.g. a Llama MLP of width 11008 over a hidden width of 4096), which cannot be cut into
square blocks.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import ProjectionShape, ReparameterizedDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site

Variant = Literal["tt", "tk"]


class FactConfig(DeltaConfig):
    """FacT's fields (the paper's code's defaults: rank 8 for TT, scale 1)."""

    variant: Variant = Field(
        "tt",
        description="tt: tensor-train, a trained r × r core per d × d block; tk: Tucker, a "
        "shared r × r × r core and a trained r-vector per block",
    )
    r: int = Field(8, ge=1, le=4096, description="rank of the shared factors U, V (d × r)")
    scale: float = Field(1.0, gt=0.0, le=1e4, description="factor s on every ΔW")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout on the r-wide hidden vector, before U"
    )


def block_size(site: ModuleSite) -> int:
    """``min(d_in, d_out)`` of a projection site: the side of its square blocks."""
    assert site.weight is not None
    return min(site.weight.in_features, site.features)


def factor_key(site: ModuleSite) -> str:
    """The name of the ``(U, V)`` pair ``site`` uses: its tower and block size."""
    tower = re.sub(r"\W", "_", site.tower) if site.tower else "model"
    return f"{tower}_{block_size(site)}"


def factor_groups(sites: tuple[Site, ...]) -> dict[str, int]:
    """Factor pair name -> block size, for the projection sites among ``sites``."""
    out: dict[str, int] = {}
    for s in sites:
        if isinstance(s, ModuleSite) and s.weight is not None and s.weight.layout != "conv":
            out[factor_key(s)] = block_size(s)
    return dict(sorted(out.items()))


def _uniform(shape: tuple[int, ...], bound: float) -> Tensor:
    return torch.empty(shape).uniform_(-bound, bound)


class FactFactors(nn.Module):
    """The adapter's shared factors: ``U[key]`` and ``V[key]`` ``(d, r)`` per tower and block
    size ``d``, and for FacT-TK the core ``C`` ``(r, r, r)``."""

    def __init__(self, groups: dict[str, int], r: int, variant: Variant) -> None:
        super().__init__()
        self.U = nn.ParameterDict({k: nn.Parameter(torch.zeros(d, r)) for k, d in groups.items()})
        self.V = nn.ParameterDict(
            {k: nn.Parameter(_uniform((d, r), 1.0 / math.sqrt(d))) for k, d in groups.items()}
        )
        if variant == "tk":
            self.core = nn.Parameter(_uniform((r, r, r), math.sqrt(3.0) / r))


class FactDelta(ReparameterizedDelta):
    """One projection's slice of the FacT tensor: ``n_out × n_in`` blocks of size ``d``, each
    ``s · U Σ Vᵀ`` with the adapter's shared ``U``, ``V`` (read through :attr:`shared`)."""

    def __init__(
        self,
        shape: ProjectionShape,
        shared: FactFactors,
        key: str,
        r: int,
        variant: Variant = "tt",
        scale: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(shape)
        self.use_shared(shared)
        self.key = key
        self.variant = variant
        self.scale = scale
        self.block = min(shape.in_features, shape.out_features)
        self.n_out = shape.out_features // self.block
        self.n_in = shape.in_features // self.block
        bound = 1.0 / math.sqrt(r)
        if variant == "tt":
            self.sigma = nn.Parameter(_uniform((self.n_out, self.n_in, r, r), bound))
        else:
            self.p = nn.Parameter(_uniform((self.n_out, self.n_in, r), bound))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def cores(self) -> Tensor:
        """``Σ`` of every block, ``(n_out, n_in, r, r)``: trained (TT) or ``C ×₃ p`` (TK)."""
        if self.variant == "tt":
            return self.sigma
        return torch.einsum("qrk,abk->abqr", self.shared.core, self.p)

    def factors(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """This site's shared ``U`` and ``V`` ``(d, r)`` in ``like``'s dtype."""
        return (
            self.shared.U[self.key].to(like.dtype),
            self.shared.V[self.key].to(like.dtype),
        )

    def delta_weight(self) -> Tensor:
        u, v = self.factors(self.cores())
        d = self.block
        blocks = torch.einsum("iq,abqr,jr->aibj", u, self.cores(), v)
        return self.scale * blocks.reshape(self.n_out * d, self.n_in * d)

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        u, v = self.factors(x)
        lead = x.shape[:-1]
        h = x.reshape(*lead, self.n_in, self.block) @ v  # (..., n_in, r)
        h = torch.einsum("...br,abqr->...aq", h, self.cores().to(x.dtype))
        out = self.dropout(h) @ u.t()  # (..., n_out, d)
        return y + (self.scale * out.reshape(*lead, self.shape.out_features)).to(y.dtype)


def _shared(cfg: FactConfig, sites: tuple[Site, ...]) -> FactFactors:
    """The factors U, V (d × r) per tower and block size, and the r × r × r core for tk."""
    return FactFactors(factor_groups(sites), cfg.r, cfg.variant)


def _shared_count(cfg: FactConfig, sites: tuple[Site, ...]) -> int:
    pairs = sum(2 * d * cfg.r for d in factor_groups(sites).values())
    return pairs + (cfg.r**3 if cfg.variant == "tk" else 0)


def _build(cfg: FactConfig, site: Site, shared: FactFactors) -> FactDelta:
    assert isinstance(site, ModuleSite)
    shape = ProjectionShape.of(site)
    return FactDelta(shape, shared, factor_key(site), cfg.r, cfg.variant, cfg.scale, cfg.dropout)


def _count(cfg: FactConfig, site: Site) -> int:
    assert isinstance(site, ModuleSite) and site.weight is not None
    d = block_size(site)
    blocks = (site.features // d) * (site.weight.in_features // d)
    return blocks * (cfg.r * cfg.r if cfg.variant == "tt" else cfg.r)


def _accepts(cfg: FactConfig, site: Site) -> str | None:
    if not isinstance(site, ModuleSite) or site.weight is None:
        return None
    if site.weight.layout == "conv":
        return (
            f"FacT adapts Linear-like projections (nn.Linear, GPT-2 Conv1D, fused q/k/v "
            f"slices, nn.MultiheadAttention in_proj slices), and {site.name!r} is a "
            "convolution: the shared d × r factors have no kernel dimension. Target the "
            "attention or MLP projections instead (e.g. attn.q, attn.v, mlp.up, mlp.down)"
        )
    d_in, d_out = site.weight.in_features, site.features
    if max(d_in, d_out) % min(d_in, d_out):
        return (
            f"FacT cuts each projection into square blocks of its smaller width, and "
            f"{site.name!r} maps {d_in} -> {d_out} features: {max(d_in, d_out)} is not a "
            f"multiple of {min(d_in, d_out)}. Target projections whose widths divide each "
            "other (e.g. attn.q, attn.k, attn.v, attn.out), or leave this one out"
        )
    return None


METHOD = Method(
    id="fact",
    family="reparameterized",
    config=FactConfig,
    build=_build,  # type: ignore[arg-type]
    num_parameters=_count,
    formula="per projection, (d_out / d) · (d_in / d) blocks (d = min(d_in, d_out)) of r² "
    "(tt) or r (tk) parameters; plus, shared by the adapter, 2 · d · r per tower and block "
    "size d (U and V), and r³ for the tk core",
    site_kinds=("projection",),
    accepts=_accepts,
    refuses="convolutions, and projections whose larger width is not a multiple of the "
    "smaller (they cannot be cut into square blocks)",
    default_targets=("attn.q", "attn.k", "attn.v", "attn.out", "mlp.up", "mlp.gate?", "mlp.down"),
    budget_field="r",
    mergeable=True,
    identity_at_init=True,
    shared=_shared,
    shared_parameters=_shared_count,
    paper="Jie, Deng, FacT: Factor-Tuning for Lightweight Adaptation on Vision Transformer, "
    "AAAI 2023, arXiv:2212.03145",
    summary="all layers' weight updates as one tensor of d × d blocks, tensor-train (tt) or "
    "Tucker (tk) factorized with factors shared by every layer; mergeable",
)

__all__ = ["METHOD", "FactConfig", "FactDelta", "FactFactors"]
