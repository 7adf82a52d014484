"""LoKr: a weight change that is the Kronecker product of two small factors.

LyCORIS's LoKr (Yeh et al., 2024; the Kronecker adapter of Edalati et al., KronA, 2022). The
projection's widths are split as ``d_out = a · c`` and ``d_in = b · d`` (:func:`kron_split`),
and

    ΔW = s · W1 ⊗ W2        s = alpha / r        W1 (a, b),  W2 (c, d[, *kernel])

reshaped to the weight's ``(d_out, d_in, *kernel)``. ``W2`` is stored whole when ``r`` is at
least half its larger side, else as a rank-``r`` product ``W2_a W2_b`` (over the flattened
``d · k`` on a convolution, or, with ``use_effective_conv2d`` and a kernel larger than 1, as
a Tucker product with core ``(r, r, *kernel)``, ``(r, c)`` and ``(r, d)`` factors).
``W1`` is stored whole, or, with ``decompose_both`` and ``r`` below half its larger side, as
``W1_a W1_b``. Which of these apply depends on the site's widths, so the parameter count
is computed by the same helper the delta is built from (:func:`kron_layout`).

Splitting a width: with ``decompose_factor`` ``f`` dividing it, ``(f, width / f)``; otherwise
the pair of divisors closest to the square root whose smaller one is at most ``f`` (any, by
default), smaller first. On a ``nn.Conv1d`` whose ``W2`` is stored whole, PEFT forms the
Kronecker product of the 2-D ``W1`` with the 3-D ``W2`` (``torch.kron`` then treats ``W1``
as ``(1, a, b)``) before reshaping; unipeft computes the same weight there, so that both
libraries give the same function for the same tensors.

Default init (PEFT's): ``W1`` (or ``W1_a``) is zero, the rest Kaiming-uniform: the identity
at init. ``init="lycoris"``: ``W2`` (or ``W2_b``) is zero instead, as LyCORIS does (also
the identity); ``init="random"``: every factor drawn (not the identity). Training only:
``rank_dropout`` zeroes each output row of ``ΔW`` with that probability (the kept rows are
rescaled by the inverse of their share with ``rank_dropout_scale``); ``module_dropout``
skips the whole update on a forward pass with that probability.

Nothing is shared across sites. PEFT equivalent: ``peft_type="LOKR"`` (``LoKrConfig``):
``r``, ``alpha``, ``rank_dropout``, ``module_dropout``, ``rank_dropout_scale``,
``use_effective_conv2d``, ``decompose_both`` map one to one; ``decompose_factor=-1`` is
``None``; ``init_weights`` True / ``"lycoris"`` / False is ``init`` ``"default"`` /
``"lycoris"`` / ``"random"``; the tensors are ``lokr_w1`` ... ``lokr_t2`` (see
:mod:`unipeft.features.interop.codecs.lokr`).

Sites: every projection layout: Linear, GPT-2 ``Conv1D`` (canonical ``(out, in)`` weight),
slices of fused projections and of ``nn.MultiheadAttention``'s ``in_proj_weight`` (the
slice's widths are split), and convolutions (ΔW applied with the site's stride, padding and
dilation). Only modules without a weight are refused (``site_kinds=("projection",)``).
No rank is refused: ``r`` also sets the scale, and a large one just stores ``W2`` whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import ProjectionShape, ReparameterizedDelta
from ...contract.method import Method
from ...contract.sites import Site
from .loha import kaiming_, row_dropout, skips_update, tucker, uses_tucker


class LokrConfig(DeltaConfig):
    r: int = Field(
        8,
        ge=1,
        le=4096,
        description="rank of a factor stored as a product (W2 when r < half its larger side; "
        "W1 too with decompose_both); also sets the scale alpha / r",
    )
    alpha: float = Field(8.0, gt=0, description="scale numerator: ΔW is scaled by alpha / r")
    rank_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="training only: probability of zeroing each output row of ΔW",
    )
    rank_dropout_scale: bool = Field(
        False,
        description="with rank_dropout: rescale the kept rows by the inverse of their share",
    )
    module_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="training only: probability of skipping the whole update on a forward pass",
    )
    use_effective_conv2d: bool = Field(
        False,
        description="on convolutions with a kernel larger than 1, when W2 is a product: build "
        "it as a Tucker product, core (r, r, *kernel) with (r, c) and (r, d) factors, instead "
        "of a product over the flattened (c, d·k)",
    )
    decompose_both: bool = Field(
        False,
        description="also store W1 as a rank-r product when r is below half its larger side",
    )
    decompose_factor: int | None = Field(
        None,
        ge=1,
        le=1 << 20,
        description="how widths are split into a Kronecker pair: f dividing the width gives "
        "(f, width / f); otherwise the divisor pair closest to the square root whose smaller "
        "side is at most f. None: closest to the square root (PEFT's -1)",
    )
    init: Literal["default", "lycoris", "random"] = Field(
        "default",
        description="default: W1 (or W1_a) starts at zero (PEFT's init_weights=True); lycoris: "
        "W2 (or W2_b) starts at zero; both are the identity at init. random: every factor "
        "Kaiming-uniform (not the identity)",
    )


# ------------------------------------------------------------------ the layout (shared helper)


def kron_split(width: int, factor: int | None = None) -> tuple[int, int]:
    """Split ``width`` into a pair whose product is ``width`` (LyCORIS's rule).

    ``factor`` dividing ``width`` gives ``(factor, width // factor)`` as is. Otherwise the
    smaller divisor is raised, one divisor at a time, while it stays below its cofactor and
    at most ``factor`` (``None``: no limit); the pair is returned smaller first.
    """
    if factor is not None and factor > 0 and width % factor == 0:
        return factor, width // factor
    limit = width if factor is None else factor
    small, large = 1, width
    while small < large:
        nxt = small + 1
        while width % nxt:
            nxt += 1
        if nxt > limit:
            break
        small, large = nxt, width // nxt
    return min(small, large), max(small, large)


@dataclass(frozen=True)
class KronLayout:
    """How LoKr factors one projection: ``d_out = a·c``, ``d_in = b·d``, which factors are
    stored whole, and the parameter shapes that follow."""

    a: int
    b: int
    c: int
    d: int
    kernel: tuple[int, ...]
    r: int
    whole_w1: bool
    whole_w2: bool
    tucker: bool
    """``W2`` is a Tucker product (a convolution with use_effective_conv2d)."""
    is_conv: bool

    @property
    def flat_kernel(self) -> int:
        return math.prod(self.kernel)

    @property
    def w1_leading(self) -> bool:
        """PEFT's 1-D convolution with a whole ``W2``: ``W1`` is widened in front, not behind
        (see the module docstring)."""
        return self.is_conv and len(self.kernel) == 1 and self.whole_w2

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's shape; the delta creates exactly these."""
        a, b, c, d, r, kernel = self.a, self.b, self.c, self.d, self.r, self.kernel
        out: dict[str, tuple[int, ...]] = (
            {"w1": (a, b)} if self.whole_w1 else {"w1_a": (a, r), "w1_b": (r, b)}
        )
        if self.whole_w2:
            out["w2"] = (c, d, *kernel)
        elif self.tucker:
            out.update({"w2_a": (r, c), "w2_b": (r, d), "t2": (r, r, *kernel)})
        else:
            out.update({"w2_a": (c, r), "w2_b": (r, d * self.flat_kernel)})
        return out

    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.shapes().values())


def kron_layout(cfg: LokrConfig, shape: ProjectionShape) -> KronLayout:
    """The :class:`KronLayout` of ``cfg`` at a projection of ``shape``."""
    a, c = kron_split(shape.out_features, cfg.decompose_factor)
    b, d = kron_split(shape.in_features, cfg.decompose_factor)
    r = cfg.r
    whole_w1 = not (cfg.decompose_both and r < max(a, b) / 2)
    whole_w2 = not (r < max(c, d) / 2)
    return KronLayout(
        a=a,
        b=b,
        c=c,
        d=d,
        kernel=tuple(shape.kernel_size) if shape.is_conv else (),
        r=r,
        whole_w1=whole_w1,
        whole_w2=whole_w2,
        tucker=not whole_w2 and uses_tucker(shape, cfg.use_effective_conv2d),
        is_conv=shape.is_conv,
    )


def lokr_parameters(cfg: LokrConfig, site: Site) -> int:
    """The parameter count of :func:`kron_layout` at ``site``."""
    return kron_layout(cfg, ProjectionShape.of(site)).num_parameters()  # type: ignore[arg-type]


# ------------------------------------------------------------------ the delta


class LokrDelta(ReparameterizedDelta):
    """``y + x ΔW^T`` (or the convolution with ΔW) with ``ΔW = s · W1 ⊗ W2``; parameters as
    :meth:`KronLayout.shapes` says."""

    def __init__(self, shape: ProjectionShape, cfg: LokrConfig) -> None:
        super().__init__(shape)
        self.layout = kron_layout(cfg, shape)
        self.r = cfg.r
        self.scaling = cfg.alpha / cfg.r
        self.rank_dropout = cfg.rank_dropout
        self.rank_dropout_scale = cfg.rank_dropout_scale
        self.module_dropout = cfg.module_dropout
        for name, size in self.layout.shapes().items():
            self.register_parameter(name, nn.Parameter(torch.empty(size)))
        self.reset(cfg.init)

    @torch.no_grad()
    def reset(self, init: str = "default") -> None:
        """Draw the factors again; ``default`` zeroes ``W1`` (``W1_a``), ``lycoris`` ``W2``
        (``W2_b``), ``random`` nothing."""
        zero = {"default": ("w1", "w1_a"), "lycoris": ("w2", "w2_b"), "random": ()}.get(init)
        if zero is None:
            raise ValueError(f"unknown init {init!r}: use 'default', 'lycoris' or 'random'")
        for name, p in self.named_parameters():
            if name in zero:
                p.zero_()
            else:
                kaiming_(p)

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(W1, W2)``: ``W1`` ``(a, b)``; ``W2`` ``(c, d, *kernel)``, or ``(c, d·k)`` when
        it is a product over the flattened kernel."""
        w1 = self.w1 if self.layout.whole_w1 else self.w1_a @ self.w1_b
        if self.layout.whole_w2:
            w2 = self.w2
        elif self.layout.tucker:
            w2 = tucker(self.t2, self.w2_a, self.w2_b)
        else:
            w2 = self.w2_a @ self.w2_b
        return w1, w2

    def delta_weight(self) -> Tensor:
        w1, w2 = self.factors()
        extra = w2.ndim - w1.ndim
        if extra:  # W1 as a tensor of W2's order: widened behind (or, PEFT's Conv1d, in front)
            ones = (1,) * extra
            w1 = (
                w1.reshape(*ones, *w1.shape)
                if self.layout.w1_leading
                else w1.reshape(*w1.shape, *ones)
            )
        w = torch.kron(w1, w2.contiguous()) * self.scaling
        return w.reshape(self.shape.out_features, self.shape.in_features, *self.layout.kernel)

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        if skips_update(self, self.module_dropout):
            return y
        w = self.delta_weight()
        if self.training and self.rank_dropout > 0:
            w = row_dropout(w, self.rank_dropout, rescale=self.rank_dropout_scale)
        return y + self.shape.project(x, w.to(x.dtype)).to(y.dtype)


# ------------------------------------------------------------------ the record


def _build(cfg: LokrConfig, site: Site) -> LokrDelta:
    return LokrDelta(ProjectionShape.of(site), cfg)  # type: ignore[arg-type]


METHOD = Method(
    id="lokr",
    refuses="nothing beyond non-projection sites",
    family="reparameterized",
    config=LokrConfig,
    build=_build,
    num_parameters=lokr_parameters,
    formula="|W1| + |W2| per projection, d_out = a·c and d_in = b·d split near their square "
    "roots: W1 = a·b (or r·(a + b) with decompose_both when r < max(a, b)/2); W2 = c·d·k "
    "when r >= max(c, d)/2, else r·(c + d·k), or r·(c + d) + r²·k with use_effective_conv2d "
    "(k: kernel elements, 1 for Linear)",
    site_kinds=("projection",),
    default_targets=("attn.q", "attn.v"),
    budget_field=None,  # the count is not monotonic in r: past half a side a factor is stored whole
    mergeable=True,
    identity_at_init=lambda cfg: cfg.init != "random",
    paper="Yeh et al., Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to "
    "Model Evaluation (LyCORIS), 2024, arXiv:2309.14859; Edalati et al., KronA: Parameter "
    "Efficient Tuning with Kronecker Adapter, 2022, arXiv:2212.10650",
    summary="Kronecker product of two small factors as the weight change; mergeable",
)
