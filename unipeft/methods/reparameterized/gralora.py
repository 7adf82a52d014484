"""GraLoRA: granular low-rank adaptation, one low-rank pair per block of the weight.

Jung et al., *GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient Fine-Tuning*,
NeurIPS 2025, arXiv:2505.20355. The weight ``(d_out, d_in)`` is cut into ``k × k`` blocks;
block ``(m, n)`` (output block ``m``, input block ``n``) gets its own update of rank
``s = r / k``:

    ΔW[m, n] = (α / (r + h)) · B_m[n]ᵀ A_n[m]ᵀ          (d_out/k × d_in/k, rank s)
    ΔW      += (α / (r + h)) · B_h A_h                    (hybrid part, rank h; h = 0: none)
    y' = y + ΔW dropout(x)

``A`` ``(k, d_in/k, r)`` holds, per input block ``n``, the ``k`` down-projections
``A_n[m] = A[n, :, m·s:(m+1)·s]``; ``B`` ``(k, r, d_out/k)`` holds, per output block
``m``, the ``k`` up-projections ``B_m[n] = B[m, n·s:(n+1)·s, :]``. The parameters are
those of a LoRA of rank ``r`` (``r · (d_in + d_out)``) but ``ΔW`` can reach rank
``k · r``. With ``hybrid_r = h > 0`` a plain LoRA pair ``A_h`` ``(h, d_in)``, ``B_h``
``(d_out, h)`` is added (hybrid GraLoRA). ``B`` and ``B_h`` start at zero (identity at
init); ``A`` is uniform in ``±1/sqrt(d_in/k)`` (kaiming, per block), ``A_h`` in
``±1/sqrt(d_in)``. Nothing is shared across sites.

PEFT equivalent: ``peft_type="GRALORA"``; ``r``, ``alpha``, ``gralora_k``, ``hybrid_r`` keep
their names, ``dropout`` -> ``gralora_dropout``; tensors ``gralora_A`` = ``A``,
``gralora_B`` = ``B``, ``gralora_A_general.weight`` = ``A_hybrid``,
``gralora_B_general.weight`` = ``B_hybrid``, in the same layouts.

Sites: Linear, GPT-2 ``Conv1D``, slices of fused projections and the ``in_proj`` slices of
``nn.MultiheadAttention``. Convolutions are refused (the blocks are blocks of a matrix;
PEFT's GraLoRA takes Linear and Conv1D only). ``gralora_k`` must divide both widths of
every site and ``r`` (``r`` is checked with the config).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import ProjectionShape, ReparameterizedDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site


class GraloraConfig(DeltaConfig):
    r: int = Field(
        8, ge=1, le=4096, description="rank of the block updates together: each of the k × k "
        "blocks gets rank r / gralora_k (a multiple of gralora_k)"
    )  # fmt: skip
    alpha: float = Field(
        16.0, gt=0, description="scale numerator: ΔW is scaled by alpha / (r + hybrid_r)"
    )
    gralora_k: int = Field(
        2, ge=1, le=256, description="blocks per side: the weight is cut into gralora_k × "
        "gralora_k blocks; must divide r and both widths of every site"
    )  # fmt: skip
    hybrid_r: int = Field(
        0, ge=0, le=4096, description="rank of an added plain LoRA update over the whole weight "
        "(hybrid GraLoRA); 0: none"
    )  # fmt: skip
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of the update")

    @model_validator(mode="after")
    def _k_divides_r(self) -> GraloraConfig:
        if self.r % self.gralora_k:
            raise ValueError(
                f"r ({self.r}) must be a multiple of gralora_k ({self.gralora_k}): each of the "
                f"gralora_k × gralora_k blocks gets rank r / gralora_k"
            )
        return self


class GraloraDelta(ReparameterizedDelta):
    """``y + s · (block-wise update + B_h A_h) dropout(x)``, ``s = alpha / (r + hybrid_r)``.

    ``A``: ``(k, in/k, r)``, ``B``: ``(k, r, out/k)``; with ``hybrid_r > 0`` also
    ``A_hybrid``: ``(hybrid_r, in)`` and ``B_hybrid``: ``(out, hybrid_r)``.
    """

    def __init__(
        self,
        shape: ProjectionShape,
        r: int,
        alpha: float,
        k: int,
        hybrid_r: int = 0,
        dropout: float = 0.0,
    ) -> None:
        if shape.is_conv:
            raise TypeError("GraLoRA adapts matrices, not convolutions")
        d_in, d_out = shape.in_features, shape.out_features
        if d_in % k or d_out % k or r % k:
            raise ValueError(f"gralora_k={k} must divide r={r}, d_in={d_in} and d_out={d_out}")
        super().__init__(shape)
        self.r, self.k, self.hybrid_r = r, k, hybrid_r
        self.scaling = alpha / (r + hybrid_r)
        bound = 1.0 / math.sqrt(d_in // k)  # kaiming_uniform(a=√5) on each (r, in/k) factor
        self.A = nn.Parameter(torch.empty(k, d_in // k, r).uniform_(-bound, bound))
        self.B = nn.Parameter(torch.zeros(k, r, d_out // k))
        if hybrid_r > 0:
            self.A_hybrid = nn.Parameter(torch.empty(hybrid_r, d_in))
            nn.init.kaiming_uniform_(self.A_hybrid, a=math.sqrt(5))
            self.B_hybrid = nn.Parameter(torch.zeros(d_out, hybrid_r))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def blocks(self, x: Tensor) -> Tensor:
        """The block-wise update of ``x`` ``(N, in)``, unscaled: ``(N, out)``."""
        k, s = self.k, self.r // self.k
        n = x.shape[0]
        h = torch.einsum("bni,nir->bnr", x.view(n, k, -1), self.A.to(x.dtype))
        # h[b, n, m·s + j] feeds output block m: regroup as [b, m, (n, j)]
        h = h.view(n, k, k, s).transpose(1, 2).reshape(n, k, self.r)
        return torch.einsum("bmr,mro->bmo", h, self.B.to(x.dtype)).reshape(n, -1)

    def delta_weight(self) -> Tensor:
        k, s = self.k, self.r // self.k
        a = self.A.view(k, -1, k, s)  # [n, i, m, j]
        b = self.B.view(k, k, s, -1)  # [m, n, j, o]
        w = torch.einsum("mnjo,nimj->moni", b, a).reshape(self.shape.out_features, -1)
        if self.hybrid_r > 0:
            w = w + self.B_hybrid @ self.A_hybrid
        return w * self.scaling

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        h = self.dropout(x)
        flat = h.reshape(-1, h.shape[-1])
        up = self.blocks(flat)
        if self.hybrid_r > 0:
            a, b = self.A_hybrid.to(h.dtype), self.B_hybrid.to(h.dtype)
            up = torch.addmm(up, flat @ a.t(), b.t())
        return y + (up * self.scaling).view(*y.shape[:-1], -1).to(y.dtype)


def _build(cfg: GraloraConfig, site: Site) -> GraloraDelta:
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    return GraloraDelta(shape, cfg.r, cfg.alpha, cfg.gralora_k, cfg.hybrid_r, cfg.dropout)


def _count(cfg: GraloraConfig, site: Site) -> int:
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    return (cfg.r + cfg.hybrid_r) * (shape.in_features + shape.out_features)


def _accepts(cfg: GraloraConfig, site: Site) -> str | None:
    assert isinstance(site, ModuleSite)
    if site.weight is not None and site.weight.layout == "conv":
        return (
            f"{site.name!r} is a convolution, and GraLoRA's blocks are blocks of a weight matrix "
            "(PEFT's GraLoRA adapts nn.Linear and Conv1D only); target linear projections "
            "(attn.q, attn.v, mlp.up...) instead, or use lora on convolutions"
        )
    return None


def _size_check(cfg: GraloraConfig, site: Site) -> str | None:
    if getattr(site, "weight", None) is None or site.weight.layout == "conv":  # type: ignore[union-attr]
        return None  # refused by _accepts, with its own reason
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    d_in, d_out, k = shape.in_features, shape.out_features, cfg.gralora_k
    if d_in % k or d_out % k:
        fits = [j for j in range(1, min(d_in, d_out) + 1) if d_in % j == 0 and d_out % j == 0]
        return (
            f"gralora_k={k} does not divide the widths of this {d_in}->{d_out} projection, so "
            f"its weight cannot be cut into {k} × {k} equal blocks. Choose gralora_k among "
            f"the common divisors of {d_in} and {d_out}: {fits}"
        )
    full = min(d_in, d_out)
    if cfg.r > full:
        return (
            f"r={cfg.r} gives each {d_out // k}x{d_in // k} block rank r / gralora_k = "
            f"{cfg.r // k}, above the largest it can have ({full // k}); a larger rank only "
            f"adds parameters. Choose r <= {full}"
        )
    if cfg.hybrid_r > full:
        return (
            f"hybrid_r={cfg.hybrid_r} is above the largest rank an update of this {d_in}->"
            f"{d_out} projection can have ({full}); a larger rank only adds parameters. "
            f"Choose hybrid_r <= {full}"
        )
    return None


METHOD = Method(
    id="gralora",
    refuses=(
        "convolutions; gralora_k not dividing both widths; r or hybrid_r above min(d_in, d_out)"
    ),
    family="reparameterized",
    config=GraloraConfig,
    build=_build,
    num_parameters=_count,
    formula="(r + hybrid_r) · (d_in + d_out) per projection",
    site_kinds=("projection",),
    default_targets=("attn.q", "attn.v"),
    budget_field=None,  # r must stay a multiple of gralora_k, which plan_budget cannot search
    mergeable=True,
    identity_at_init=True,
    paper="Jung et al., GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient "
    "Fine-Tuning, NeurIPS 2025, arXiv:2505.20355",
    summary="a low-rank pair per block of a k × k grid of the weight (rank up to k · r for "
    "LoRA's parameters), optionally plus a plain LoRA; mergeable",
    accepts=_accepts,
    size_check=_size_check,
)
