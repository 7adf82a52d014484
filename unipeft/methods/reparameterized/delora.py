"""DeLoRA: a low-rank update whose direction and strength are learned apart.

Bini, Girrbach and Akata, *Decoupling Angles and Strength in Low-rank Adaptation*, ICLR
2025, arXiv:2503.18225. Every rank-one
term of ``B A`` is normalised to unit norm, their sum is scaled by a learnable boundary
``λ`` over ``r``, and the result is scaled per input column by the frozen weight's column
norms:

    ΔW = (λ / r) · B diag(1 / (‖b_i‖ ‖a_i‖)) A · diag(‖W_:,j‖)
    y' = y + ΔW dropout(x)

with ``a_i`` the rows of ``A`` ``(r, d_in)``, ``b_i`` the columns of ``B`` ``(d_out, r)``
(each norm clamped below at 1e-4), so ``‖ΔW‖_F <= λ · max_j ‖W_:,j‖`` whatever ``A`` and
``B`` learn. ``B`` starts at zero (identity at init) and ``λ`` at ``boundary``.

The column norms ``‖W_:,j‖`` (``(d_in,)``, over the output rows the site owns: its slice of
a fused projection) are read once, through :meth:`~unipeft.ModuleSite.weight_views`, when
the delta is built, and kept as the persistent buffer ``w_norm``: saved and loaded with the
adapter, never trained, as PEFT keeps them. ``ΔW`` is therefore a fixed change of the weight:
the method merges, and the norms of a weight that another adapter later changes are not
re-read. Nothing is shared across sites.

PEFT equivalent: ``peft_type="DELORA"``; ``r`` -> ``r``, ``boundary`` -> ``delora_lambda``,
``dropout`` -> ``module_dropout``; tensors ``delora_A`` = ``A``, ``delora_B`` = ``B``,
``delora_lambda`` = ``boundary`` ``(1,)``, ``delora_w_norm`` = ``w_norm``.

Sites: Linear, GPT-2 ``Conv1D`` (its canonical ``(out, in)`` weight), slices of fused
projections and the ``in_proj`` slices of ``nn.MultiheadAttention``. Convolutions are
refused: the update is defined on a matrix (PEFT's DeLoRA takes ``nn.Linear`` only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ...blocks import low_rank_refusal
from ...contract.config import DeltaConfig
from ...contract.deltas import ProjectionShape, ReparameterizedDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site

NORM_FLOOR = 1e-4
"""The smallest norm a row of ``A`` or a column of ``B`` is divided by (PEFT's clamp)."""


class DeloraConfig(DeltaConfig):
    r: int = Field(8, ge=1, le=4096, description="rank of the update (rank-one terms in B A)")
    boundary: float = Field(
        15.0,
        gt=0,
        description="initial value of the learnable boundary λ: ‖ΔW‖_F <= λ · the largest "
        "column norm of the frozen weight (PEFT's delora_lambda)",
    )
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="dropout on the input of the update (PEFT's module_dropout)",
    )


class DeloraDelta(ReparameterizedDelta):
    """``y + (λ/r) · B diag(1/(‖b_i‖‖a_i‖)) A (w_norm ⊙ dropout(x))``.

    ``A``: ``(r, in)``, ``B``: ``(out, r)``, ``boundary`` (λ): ``(1,)``; buffer ``w_norm``:
    ``(in,)``, the column norms of the site's weight when the delta was built.
    """

    def __init__(self, site: ModuleSite, r: int, boundary: float, dropout: float = 0.0) -> None:
        shape = ProjectionShape.of(site)
        if shape.is_conv:
            raise TypeError(f"site {site.name!r}: DeLoRA adapts matrices, not convolutions")
        super().__init__(shape)
        self.r = r
        self.A = nn.Parameter(torch.empty(r, shape.in_features))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(shape.out_features, r))
        self.boundary = nn.Parameter(torch.full((1,), float(boundary)))
        weight, _ = site.weight_views()
        if tuple(weight.shape) != (shape.out_features, shape.in_features):
            raise ValueError(
                f"site {site.name!r}: its weight is {tuple(weight.shape)}, expected "
                f"({shape.out_features}, {shape.in_features})"
            )
        with torch.no_grad():
            wide = torch.promote_types(weight.dtype, torch.float32)
            norm = torch.linalg.vector_norm(weight, dim=0, dtype=wide)
        self.register_buffer("w_norm", norm.to(weight.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def factors(self) -> tuple[Tensor, Tensor]:
        """``Â`` ``(r, in)``: the rows of ``A`` over their norms, and ``B̂`` ``(out, r)``: the
        columns of ``B`` over their norms, times ``λ / r``; so that ``ΔW = B̂ Â diag(w_norm)``.
        In float32 (or wider): at init ``B = 0``, and ``λ / (r · 1e-4)`` would overflow a
        half-precision number before multiplying the zeros."""
        dtype = torch.promote_types(self.A.dtype, torch.float32)
        a, b = self.A.to(dtype), self.B.to(dtype)
        a_hat = a / a.norm(dim=1, keepdim=True).clamp_min(NORM_FLOOR)
        b_hat = b * (self.boundary.to(dtype) / self.r / b.norm(dim=0).clamp_min(NORM_FLOOR))
        return a_hat, b_hat

    def delta_weight(self) -> Tensor:
        a_hat, b_hat = self.factors()
        return (b_hat @ a_hat * self.w_norm.to(a_hat.dtype)).to(self.A.dtype)

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        a_hat, b_hat = self.factors()
        h = self.dropout(x) * self.w_norm.to(x.dtype)
        u = F.linear(h, a_hat.to(h.dtype))
        return y + F.linear(u, b_hat.to(u.dtype)).to(y.dtype)


def _build(cfg: DeloraConfig, site: Site) -> DeloraDelta:
    assert isinstance(site, ModuleSite)
    return DeloraDelta(site, cfg.r, cfg.boundary, cfg.dropout)


def _count(cfg: DeloraConfig, site: Site) -> int:
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    return cfg.r * (shape.in_features + shape.out_features) + 1


def _accepts(cfg: DeloraConfig, site: Site) -> str | None:
    assert isinstance(site, ModuleSite)
    if site.weight is not None and site.weight.layout == "conv":
        return (
            f"{site.name!r} is a convolution, and DeLoRA's normalised update is defined on a "
            "weight matrix (PEFT's DeLoRA adapts nn.Linear only); target linear projections "
            "(attn.q, attn.v, mlp.up...) instead, or use lora or hira on convolutions"
        )
    return None


def _size_check(cfg: DeloraConfig, site: Site) -> str | None:
    if getattr(site, "weight", None) is None or site.weight.layout == "conv":  # type: ignore[union-attr]
        return None  # refused by _accepts, with its own reason
    return low_rank_refusal("r", cfg.r, site)


METHOD = Method(
    id="delora",
    refuses="convolutions; r above min(d_in, d_out)",
    family="reparameterized",
    config=DeloraConfig,
    build=_build,
    num_parameters=_count,
    formula="r · (d_in + d_out) + 1 per projection (A, B and the boundary λ)",
    site_kinds=("projection",),
    default_targets=("attn.q", "attn.v"),
    budget_field="r",
    mergeable=True,
    identity_at_init=True,
    paper="Bini, Girrbach and Akata, Decoupling Angles and Strength in Low-rank Adaptation "
    "(DeLoRA), ICLR 2025, arXiv:2503.18225",
    summary="normalised low-rank update with a learned norm boundary, scaled by the frozen "
    "weight's column norms; mergeable",
    accepts=_accepts,
    size_check=_size_check,
)
