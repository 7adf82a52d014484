"""LoHa: a weight change that is the Hadamard product of two low-rank products.

Hyeon-Woo et al., FedPara (2022), as packaged by LyCORIS. For a projection of weight
``(d_out, d_in, *kernel)``:

    ΔW = s · (W1_a W1_b) ⊙ (W2_a W2_b)        s = alpha / r

with ``W1_a``, ``W2_a`` ``(d_out, r)`` and ``W1_b``, ``W2_b`` ``(r, d_in · k)`` (``k``: kernel
elements, 1 for a Linear); the product is reshaped to the weight's shape. Each factor has
rank ``r`` at most, their Hadamard product up to ``r²``, for ``2r(d_out + d_in·k)``
parameters. With ``use_effective_conv2d`` on a convolution whose kernel is larger than 1,
each factor is instead a Tucker product (FedPara's Proposition 3):

    W_i[p, q, κ] = Σ_ab T_i[a, b, κ] A_i[a, p] B_i[b, q]

with a core ``T_i`` ``(r, r, *kernel)``, ``A_i`` ``(r, d_out)`` and ``B_i`` ``(r, d_in)``.

Default init (PEFT's): ``W2_b`` is zero and the others Kaiming-uniform, so the adapter starts
as the identity; ``init="random"`` draws every factor (not the identity). Training only:
``rank_dropout`` zeroes each output row of ``ΔW`` with that probability and rescales the
kept rows by the inverse of their share; ``module_dropout`` skips the whole update on a
forward pass with that probability. Both are off in eval mode and never affect merging.

Nothing is shared across sites. PEFT equivalent: ``peft_type="LOHA"`` (``LoHaConfig``):
``r``, ``alpha``, ``rank_dropout``, ``module_dropout`` and ``use_effective_conv2d`` map one to
one; ``init_weights=True``/``False`` is ``init="default"``/``"random"``; the tensors are
``hada_w1_a`` ... ``hada_t2`` (see :mod:`unipeft.features.interop.codecs.loha`).

Sites: every projection layout: Linear, GPT-2 ``Conv1D`` (canonical ``(out, in)`` weight),
slices of fused projections and of ``nn.MultiheadAttention``'s ``in_proj_weight`` (the
slice's rows only), and convolutions (ΔW applied with the site's stride, padding and
dilation). Only modules without a weight are refused (``site_kinds=("projection",)``).
A rank above what one factor can reach is refused (:func:`loha_rank_refusal`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import ProjectionShape, ReparameterizedDelta
from ...contract.method import Method
from ...contract.sites import Site


class LohaConfig(DeltaConfig):
    r: int = Field(8, ge=1, le=4096, description="rank of each of the two low-rank factors")
    alpha: float = Field(8.0, gt=0, description="scale numerator: ΔW is scaled by alpha / r")
    rank_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="training only: probability of zeroing each output row of ΔW (the kept "
        "rows are rescaled by the inverse of their share)",
    )
    module_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="training only: probability of skipping the whole update on a forward pass",
    )
    use_effective_conv2d: bool = Field(
        False,
        description="on convolutions with a kernel larger than 1: build each factor as a "
        "Tucker product, core (r, r, *kernel) with (r, d_out) and (r, d_in) factors "
        "(FedPara's Proposition 3), instead of a product over the flattened (d_out, d_in·k) "
        "weight",
    )
    init: Literal["default", "random"] = Field(
        "default",
        description="default: W2_b starts at zero, so the adapter is the identity at init "
        "(PEFT's init_weights=True); random: every factor Kaiming-uniform (not the identity)",
    )


# ------------------------------------------------------------------ helpers shared with LoKr


def kaiming_(p: Tensor) -> Tensor:
    """The Kaiming-uniform init PyTorch gives Linear weights (``a = sqrt(5)``)."""
    return nn.init.kaiming_uniform_(p, a=math.sqrt(5))


def uses_tucker(shape: ProjectionShape, use_effective_conv2d: bool) -> bool:
    """Whether a convolution's factor is built as a Tucker product: asked for, and the
    kernel has more than one element (a 1×1 kernel is a matrix product already)."""
    return use_effective_conv2d and shape.is_conv and math.prod(shape.kernel_size) > 1


def tucker(core: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``W[p, q, κ] = Σ_ij core[i, j, κ] a[i, p] b[j, q]``: ``core`` ``(r, r, *kernel)``,
    ``a`` ``(r, d_out)``, ``b`` ``(r, d_in)``; returns ``(d_out, d_in, *kernel)``."""
    return torch.einsum("ij...,ip,jq->pq...", core, a, b)


def row_dropout(weight: Tensor, p: float, rescale: bool) -> Tensor:
    """``weight`` with each output row (dim 0) zeroed with probability ``p``; ``rescale``
    divides the kept rows by their share (a draw that keeps none gives zero, not NaN)."""
    keep = (torch.rand(weight.shape[0], device=weight.device) > p).to(weight.dtype)
    if rescale:
        keep = keep / keep.mean().clamp_min(torch.finfo(keep.dtype).tiny)
    return weight * keep.view(-1, *([1] * (weight.ndim - 1)))


def skips_update(module: nn.Module, p: float) -> bool:
    """Module dropout: in training, skip the update with probability ``p``."""
    return module.training and p > 0 and bool(torch.rand(()) <= p)


# ------------------------------------------------------------------ the delta


def loha_shapes(shape: ProjectionShape, r: int, use_effective_conv2d: bool) -> dict[str, tuple]:
    """The shape of every LoHa parameter at a projection of ``shape``; the delta creates
    exactly these and :func:`loha_parameters` counts them."""
    out, d_in, kernel = shape.out_features, shape.in_features, shape.kernel_size
    if uses_tucker(shape, use_effective_conv2d):
        return {
            "w1_a": (r, out),
            "w1_b": (r, d_in),
            "w2_a": (r, out),
            "w2_b": (r, d_in),
            "t1": (r, r, *kernel),
            "t2": (r, r, *kernel),
        }
    flat = d_in * math.prod(kernel)
    return {"w1_a": (out, r), "w1_b": (r, flat), "w2_a": (out, r), "w2_b": (r, flat)}


def loha_parameters(cfg: LohaConfig, site: Site) -> int:
    """``2r(d_out + d_in·k)``, or ``2(r·d_out + r·d_in + r²·k)`` with Tucker factors."""
    shapes = loha_shapes(ProjectionShape.of(site), cfg.r, cfg.use_effective_conv2d)  # type: ignore[arg-type]
    return sum(math.prod(s) for s in shapes.values())


class LohaDelta(ReparameterizedDelta):
    """``y + x ΔW^T`` (or the convolution with ΔW) with ``ΔW = s (W1_a W1_b) ⊙ (W2_a W2_b)``.

    Parameters ``w1_a``, ``w1_b``, ``w2_a``, ``w2_b`` (and the cores ``t1``, ``t2`` with
    Tucker factors), shaped as :func:`loha_shapes` says.
    """

    def __init__(
        self,
        shape: ProjectionShape,
        r: int,
        alpha: float,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        use_effective_conv2d: bool = False,
        init: str = "default",
    ) -> None:
        super().__init__(shape)
        self.r = r
        self.scaling = alpha / r
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.tucker = uses_tucker(shape, use_effective_conv2d)
        for name, size in loha_shapes(shape, r, use_effective_conv2d).items():
            self.register_parameter(name, nn.Parameter(torch.empty(size)))
        self.reset(init)

    @torch.no_grad()
    def reset(self, init: str = "default") -> None:
        """Draw the factors again: ``default`` leaves ``W2_b`` at zero (identity)."""
        if init not in ("default", "random"):
            raise ValueError(f"unknown init {init!r}: use 'default' or 'random'")
        for name, p in self.named_parameters():
            if name == "w2_b" and init == "default":
                p.zero_()
            else:
                kaiming_(p)

    @classmethod
    def from_config(cls, cfg: LohaConfig, shape: ProjectionShape) -> LohaDelta:
        return cls(
            shape,
            cfg.r,
            cfg.alpha,
            cfg.rank_dropout,
            cfg.module_dropout,
            cfg.use_effective_conv2d,
            cfg.init,
        )

    def factor(self, i: int) -> Tensor:
        """``W_i`` of the product: ``(d_out, d_in·k)``, or ``(d_out, d_in, *kernel)``."""
        a, b = getattr(self, f"w{i}_a"), getattr(self, f"w{i}_b")
        if self.tucker:
            return tucker(getattr(self, f"t{i}"), a, b)
        return a @ b

    def delta_weight(self) -> Tensor:
        w = (self.factor(1) * self.factor(2)) * self.scaling
        return w.reshape(self.shape.out_features, self.shape.in_features, *self.shape.kernel_size)

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        if skips_update(self, self.module_dropout):
            return y
        w = self.delta_weight()
        if self.training and self.rank_dropout > 0:
            w = row_dropout(w, self.rank_dropout, rescale=True)
        return y + self.shape.project(x, w.to(x.dtype)).to(y.dtype)


# ------------------------------------------------------------------ the record


def loha_rank_refusal(cfg: LohaConfig, site: Site) -> str | None:
    """A factor ``W1_a W1_b`` reaches every matrix at ``r = min(d_out, d_in·k)``; a Tucker
    factor every tensor at ``r = max(d_out, d_in)``. A larger ``r`` only adds parameters."""
    if getattr(site, "weight", None) is None:
        return None
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    if uses_tucker(shape, cfg.use_effective_conv2d):
        full, what = max(shape.out_features, shape.in_features), "Tucker factor"
    else:
        flat = shape.in_features * math.prod(shape.kernel_size)
        full, what = min(shape.out_features, flat), "factor"
    if cfg.r <= full:
        return None
    return (
        f"r={cfg.r} is above the rank at which one {what} of this {shape.in_features}->"
        f"{shape.out_features} projection can already be any weight ({full}); a larger rank "
        f"only adds parameters. Choose r <= {full}"
    )


def _build(cfg: LohaConfig, site: Site) -> LohaDelta:
    return LohaDelta.from_config(cfg, ProjectionShape.of(site))  # type: ignore[arg-type]


METHOD = Method(
    id="loha",
    refuses="nothing beyond non-projection sites; a rank above what one factor can reach",
    family="reparameterized",
    config=LohaConfig,
    build=_build,
    num_parameters=loha_parameters,
    formula="2r · (d_out + d_in · k) per projection (k: kernel elements, 1 for Linear); "
    "with use_effective_conv2d on a kernel > 1: 2 · (r · d_out + r · d_in + r² · k)",
    site_kinds=("projection",),
    default_targets=("attn.q", "attn.v"),
    budget_field="r",
    mergeable=True,
    identity_at_init=lambda cfg: cfg.init == "default",
    paper="Hyeon-Woo et al., FedPara: Low-Rank Hadamard Product for Communication-Efficient "
    "Federated Learning, 2022, arXiv:2108.06098; LyCORIS (Yeh et al., 2024, arXiv:2309.14859)",
    summary="Hadamard product of two low-rank products as the weight change; mergeable",
    size_check=loha_rank_refusal,
)
