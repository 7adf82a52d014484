"""BOFT: the projection's input rotated by a product of butterfly-permuted block-diagonal
orthogonal matrices, and its output channels scaled.

Liu et al., 2023 (ICLR 2024). The ``d = d_in · k`` features a projection reads (``k``:
kernel elements, 1 for a Linear) are cut into ``n = d / b`` blocks of size ``b``. Each of
``m`` butterfly factors ``j = 0 .. m-1`` has one orthogonal ``b × b`` matrix per block, the
exact Cayley transform of the skew part of a free ``b × b`` parameter ``A``:

    S = (A - Aᵀ) / 2        R = (I - S)(I + S)⁻¹        D_j = diag(R_j0, ..., R_j(n-1))

Factor ``j`` acts in a permuted basis, ``M_j = P_j D_j P_jᵀ``, where ``P_j`` regroups the
features in groups of ``b · 2^j``: within a group, its half-blocks (``b / 2`` features) are
taken even ones first, then odd ones (``P_0`` is the identity). With ``M = M_(m-1) ... M_1 M_0``
and a learned scale ``s`` per output channel:

    W' = s ⊙ (W Mᵀ)        y' = s ⊙ (W Mᵀ x) + b = b + s ⊙ (y - b + W (M - I)ᵀ x)

On a Linear the delta rotates its input (the row vector ``x M``, one block product and two
gathers per factor, never a ``d × d`` matrix) and adds ``W`` applied to the change, reading
the base weight and bias through :meth:`ModuleSite.weight_views` (the site is a plain
attribute). On a convolution the weight itself is rotated. ``merged`` returns
``(s ⊙ W Mᵀ, b)``. ``A`` starts at zero and ``s`` at one: the identity at init.
``boft_dropout``, in training, replaces ``floor(p · n)`` random blocks of one random factor
by the identity, as PEFT does. With ``m = 1`` the rotation is OFT's with the exact Cayley
transform (on ``b²`` free parameters per block instead of ``b (b - 1) / 2``).

Nothing is shared across sites.

As a fast path (:class:`~unipeft.contract.fastpath.FastPath`), when the delta is the only
one running on a whole Linear or GPT-2 ``Conv1D``, the output is computed as
``s ⊙ ((x M) Wᵀ) + b`` in one pass over ``W``.

PEFT equivalent: ``peft_type="BOFT"``: ``boft_block_size`` -> ``boft_block_size`` and
``boft_block_num`` -> ``boft_block_num`` (0 there is None here), ``boft_n_butterfly_factor``
and ``boft_dropout`` by the same names; the tensors ``boft_R`` ``(m, n, b, b)`` and
``boft_s`` (``(out, 1)`` on a Linear, ``(1, out)`` on a Conv2d) are this delta's
``blocks`` and ``scale`` ``(out,)``. PEFT runs ``m > 1`` only with its CUDA extension (it
falls back to ``m = 1`` without it).

Sites: every projection layout: Linear, GPT-2 ``Conv1D``, convolutions (``groups=1``),
slices of fused projections (the slice's rows of ``W`` and its channels' scales).
Refused: grouped convolutions, convolutions padded otherwise than with zeros and sites
on a parallel path (``entry``), as for OFT.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import ProjectionShape, ReparameterizedDelta
from ...contract.fastpath import FastPathParts
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site
from .oft import block_dropout, cayley, divisors, input_width, rotate_blocks, rotation_refusal


class BoftConfig(DeltaConfig):
    """Give ``boft_block_size`` or ``boft_block_num``, not both (their product is
    ``d_in · k``); ``boft_block_num`` alone clears the default block size."""

    boft_block_size: int | None = Field(
        4,
        ge=2,
        le=1 << 20,
        description="size b of each orthogonal block (must divide d_in · k); None: set by "
        "boft_block_num",
    )
    boft_block_num: int | None = Field(
        None,
        ge=1,
        le=1 << 20,
        description="number of blocks per factor (must divide d_in · k, leaving blocks of "
        "at least 2); None: set by boft_block_size",
    )
    boft_n_butterfly_factor: int = Field(
        1,
        ge=1,
        le=32,
        description="number m of butterfly factors (1: one block-diagonal rotation, as OFT); "
        "m > 1 needs an even block size and a block count divisible by 2^(m-1)",
    )
    boft_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="in training, the share of one random factor's blocks replaced by the identity",
    )

    @model_validator(mode="before")
    @classmethod
    def block_num_alone_clears_block_size(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and data.get("boft_block_num") is not None
            and "boft_block_size" not in data
        ):
            return {**data, "boft_block_size": None}
        return data

    @model_validator(mode="after")
    def one_size(self) -> BoftConfig:
        if (self.boft_block_size is None) == (self.boft_block_num is None):
            raise ValueError(
                f"set exactly one of 'boft_block_size' ({self.boft_block_size}) and "
                f"'boft_block_num' ({self.boft_block_num}): their product is the projection's "
                "input width, so one decides the other (set the other to None)"
            )
        return self


def butterfly_permutation(width: int, block_size: int, factor: int) -> Tensor:
    """The feature order of butterfly factor ``factor`` (``P_j`` as indices: ``(x P)`` is
    ``x[..., inverse]``, ``(x Pᵀ)`` is ``x[..., perm]``): in every group of
    ``block_size · 2^factor`` features, the half-blocks at even positions, then odd ones."""
    half = block_size // 2
    group = block_size * 2**factor
    chunks = group // half
    order = torch.cat([torch.arange(0, chunks, 2), torch.arange(1, chunks, 2)])
    within = (order[:, None] * half + torch.arange(half)).reshape(-1)
    return (torch.arange(0, width, group)[:, None] + within).reshape(-1)


class BoftDelta(ReparameterizedDelta, FastPathParts):
    """``b + s ⊙ (y - b + W (M - I)ᵀ x)`` with ``M`` the butterfly product of orthogonal
    block-diagonal factors (``s ⊙ W Mᵀ`` on a conv).

    ``blocks``: ``(m, n, b, b)`` free matrices whose skew parts are Cayley-transformed
    (PEFT's ``boft_R``); ``scale``: ``(out,)`` (PEFT's ``boft_s``).
    """

    def __init__(
        self, site: ModuleSite, block_size: int, factors: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__(ProjectionShape.of(site))
        self.site = site  # a plain attribute: nothing of the backbone is saved or moved
        width = input_width(self.shape)
        reason = _size_refusal(width, block_size, factors, "boft_block_size", block_size)
        if reason is not None:
            raise ValueError(f"site {site.name!r}: {reason}")
        self.block_size = block_size
        self.factors = factors
        self.dropout = dropout
        n = width // block_size
        self.blocks = nn.Parameter(torch.zeros(factors, n, block_size, block_size))
        self.scale = nn.Parameter(torch.ones(self.shape.out_features))
        if factors > 1:
            perm = torch.stack(
                [butterfly_permutation(width, block_size, j) for j in range(factors)]
            )
            self.register_buffer("perm", perm, persistent=False)
            self.register_buffer("inverse", perm.argsort(dim=1), persistent=False)

    # ------------------------------------------------------------------ the rotation

    def rotations(self, drop: bool = False) -> Tensor:
        """The orthogonal blocks ``(m, n, b, b)`` in float32 (or wider); ``drop``: apply
        ``boft_dropout`` to one random factor."""
        dtype = torch.promote_types(self.blocks.dtype, torch.float32)
        a = self.blocks.to(dtype)
        r = cayley(0.5 * (a - a.transpose(-1, -2)))
        if drop and self.dropout > 0:
            j = int(torch.randint(0, self.factors, (1,)).item())
            parts = list(r.unbind(0))
            parts[j] = block_dropout(parts[j], self.dropout)
            r = torch.stack(parts)
        return r

    def butterfly(self, x: Tensor, r: Tensor, transpose: bool = False) -> Tensor:
        """``x M`` (or ``x Mᵀ``) for row vectors ``x`` ``(..., d)``: factor by factor, each a
        gather, a block rotation and a gather back."""
        order = range(self.factors) if transpose else range(self.factors - 1, -1, -1)
        for j in order:
            blk = r[j].transpose(-1, -2) if transpose else r[j]
            if self.factors == 1:
                x = rotate_blocks(x, blk)
            else:
                z = rotate_blocks(x.index_select(-1, self.inverse[j]), blk)
                x = z.index_select(-1, self.perm[j])
        return x

    def rotated_weight(self, weight: Tensor, r: Tensor | None = None) -> Tensor:
        """``W Mᵀ`` ``(out, d)`` (not scaled) for ``weight``, in float32 or wider."""
        r = self.rotations() if r is None else r
        return self.butterfly(weight.reshape(weight.shape[0], -1).to(r.dtype), r, transpose=True)

    # ------------------------------------------------------------------ forward / merge

    def _channels(self, t: Tensor, like: Tensor) -> Tensor:
        """A per-channel vector shaped to broadcast over ``like`` (channels at dim 1 on a conv)."""
        t = t.to(like.dtype)
        return t.reshape(-1, *([1] * len(self.shape.kernel_size))) if self.shape.is_conv else t

    def _finish(self, z: Tensor, bias: Tensor | None) -> Tensor:
        """``b + s ⊙ (z - b)`` for ``z = W' x + b`` (or ``s ⊙ z`` without a bias)."""
        s = self._channels(self.scale, z)
        if bias is None:
            return z * s
        b = self._channels(bias, z)
        return torch.addcmul(b, z - b, s)

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        weight, bias = self.site.weight_views()
        r = self.rotations(drop=self.training)
        if self.shape.is_conv:
            w = weight.reshape(weight.shape[0], -1).to(r.dtype)
            dw = (self.butterfly(w, r, transpose=True) - w).reshape(weight.shape)
            z = y + self.shape.project(x, dw.to(x.dtype)).to(y.dtype)
        else:
            u = self.butterfly(x, r.to(x.dtype)) - x
            z = y + F.linear(u, weight.to(x.dtype)).to(y.dtype)
        return self._finish(z, bias)

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(s ⊙ W Mᵀ, b)`` for the ``weight`` given."""
        with torch.no_grad():
            new = self.rotated_weight(weight)
            new = new * self.scale.to(new.dtype)[:, None]
        return new.reshape(weight.shape).to(weight.dtype), bias

    def delta_weight(self) -> Tensor:
        """``s ⊙ W Mᵀ - W`` ``(out, in, *kernel)`` for the site's current weight (read it
        while the adapter is not merged)."""
        weight, _ = self.site.weight_views()
        with torch.no_grad():
            new, _ = self.merged(weight, None)
            new = new.to(torch.promote_types(weight.dtype, torch.float32))
            new = new - weight.to(new.dtype)
        return new.to(self.blocks.dtype)

    # ------------------------------------------------------------------ FastPath

    def fused_linear(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool
    ) -> Tensor | None:
        """``s ⊙ ((x M) Wᵀ) + b``: the whole output in one pass over ``W``."""
        if self.shape.is_conv:
            return None
        r = self.rotations(drop=self.training).to(x.dtype)
        z = F.linear(self.butterfly(x, r), weight.t() if transposed else weight)
        s = self.scale.to(z.dtype)
        return z * s if bias is None else torch.addcmul(bias.to(z.dtype), z, s)


# ------------------------------------------------------------------ the method record


def _fits(width: int, b: int, factors: int) -> bool:
    if b < 2 or width % b:
        return False
    return factors == 1 or (b % 2 == 0 and (width // b) % 2 ** (factors - 1) == 0)


def _listed(values: list[int]) -> str:
    shown = ", ".join(str(v) for v in values[:24])
    return (shown + (", ..." if len(values) > 24 else "")) if values else "none"


def _size_refusal(width: int, b: int, factors: int, field: str, value: int) -> str | None:
    """Why block size ``b`` (config field ``field`` set to ``value``) with ``factors``
    butterfly factors does not fit ``width`` input features, or None."""
    if _fits(width, b, factors):
        return None
    sizes = [d for d in divisors(width) if _fits(width, d, factors)]
    valid = sizes if field == "boft_block_size" else [width // d for d in reversed(sizes)]
    rule = f"{field} must divide {width}, leaving blocks of at least 2"
    if factors > 1:
        rule += (
            f"; with boft_n_butterfly_factor={factors} the block size must be even and the "
            f"number of blocks a multiple of 2^{factors - 1}={2 ** (factors - 1)}"
        )
    most = max((m for m in range(1, 33) if _fits(width, b, m)), default=None)
    hint = f" (this block size allows boft_n_butterfly_factor <= {most})" if most else ""
    return (
        f"{field}={value} does not fit the {width} input features of this projection: "
        f"{rule}. Valid {field}: {_listed(valid)}{hint}"
    )


def _block_size(cfg: BoftConfig, width: int) -> int:
    """The block size ``cfg`` gives ``width`` features (0 when the block count does not
    divide them)."""
    if cfg.boft_block_size is not None:
        return cfg.boft_block_size
    n = cfg.boft_block_num
    assert n is not None
    return width // n if width % n == 0 else 0


def _size_check(cfg: BoftConfig, site: Site) -> str | None:
    if getattr(site, "weight", None) is None:
        return None
    width = input_width(ProjectionShape.of(site))  # type: ignore[arg-type]
    b = _block_size(cfg, width)
    m = cfg.boft_n_butterfly_factor
    if cfg.boft_block_num is not None:
        return _size_refusal(width, b, m, "boft_block_num", cfg.boft_block_num)
    return _size_refusal(width, b, m, "boft_block_size", b)


def _build(cfg: BoftConfig, site: Site) -> BoftDelta:
    assert isinstance(site, ModuleSite)
    width = input_width(ProjectionShape.of(site))
    return BoftDelta(site, _block_size(cfg, width), cfg.boft_n_butterfly_factor, cfg.boft_dropout)


def _count(cfg: BoftConfig, site: Site) -> int:
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    width = input_width(shape)
    b = _block_size(cfg, width)
    return cfg.boft_n_butterfly_factor * (width // b) * b * b + shape.out_features


def _accepts(cfg: BoftConfig, site: Site) -> str | None:
    return rotation_refusal(site, "BOFT")


METHOD = Method(
    id="boft",
    refuses=(
        "sites that run on another module's input; block sizes and butterfly factors that"
        " do not fit a site's input width"
    ),
    family="reparameterized",
    config=BoftConfig,
    build=_build,
    num_parameters=_count,
    formula="m · d · b + d_out per projection (d = d_in · k, k: kernel elements, 1 for "
    "Linear; b: the block size; m: boft_n_butterfly_factor)",
    site_kinds=("projection",),
    accepts=_accepts,
    size_check=_size_check,
    default_targets=("attn.q", "attn.v"),
    budget_field=None,
    mergeable=True,
    identity_at_init=True,
    paper="Liu et al., Parameter-Efficient Orthogonal Finetuning via Butterfly "
    "Factorization, ICLR 2024, arXiv:2311.06243",
    summary="the projection's input rotated by butterfly products of orthogonal blocks and "
    "its outputs scaled per channel; mergeable",
)
