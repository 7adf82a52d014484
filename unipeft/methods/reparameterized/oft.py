"""OFT: the projection's input rotated by a block-diagonal orthogonal matrix.

Qiu et al., 2023. The ``d = d_in · k`` features a projection reads (``k``: kernel elements,
1 for a Linear; a convolution's ``(in, *kernel)`` patch, flattened) are cut into
``n = d / b`` consecutive blocks of size ``b``; each block gets an orthogonal ``b × b``
matrix ``R_i`` built from a skew-symmetric ``Q_i`` (``Q_iᵀ = -Q_i``, its ``b (b - 1) / 2``
upper-triangle entries are the parameters):

    Cayley (exact):              R_i = (I - Q_i)(I + Q_i)⁻¹
    Cayley-Neumann (m terms):    R_i = I + 2 Q_i + 2 Q_i² + ... + 2 Q_i^(m-2) + Q_i^(m-1)

(the series as PEFT 0.21.2 sums it; ``m = 3`` is summed as ``m = 4``, ``m = 1`` is ``I``,
``m = 2`` is ``I + 2 Q``). With ``R = diag(R_0, ..., R_{n-1})`` the rotated input is the row
vector ``x R`` and

    W' = W Rᵀ            y' = W' x + b = y + W (R - I)ᵀ x

so on a Linear the delta rotates its input block by block and adds ``W`` applied to the
change (the base weight is read through :meth:`ModuleSite.weight_views`; the site is kept as
a plain attribute). On a convolution the weight itself is rotated,
``y' = y + conv(x, W Rᵀ - W)``. ``merged`` returns ``W Rᵀ``; the bias is unchanged. All
parameters start at zero, ``R = I``: the adapter is the identity at init.

Options (PEFT's): ``block_share`` uses one ``R_0`` for every block; ``coft`` (constrained
OFT) projects each ``Q_i`` back into the ball ``‖Q_i‖_F <= eps / sqrt(p)`` (``p``: the
number of parameter blocks) before every use, writing the projection into the parameter,
as PEFT does; ``module_dropout`` replaces ``floor(p · n)`` random blocks by the identity in
training (PEFT 0.21.2 builds this layer for OFT but never calls it, so in training with a
non-zero ``module_dropout`` the two differ; in eval they agree).

Nothing is shared across sites.

As a fast path (:class:`~unipeft.contract.fastpath.FastPath`), when the delta is the only
one running on a whole Linear or GPT-2 ``Conv1D``, the module's output is computed as
``(x R) Wᵀ + b`` in one pass over ``W``, without the base output ``y``.

PEFT equivalent: ``peft_type="OFT"``: ``r`` -> ``r`` (0 there is None here),
``oft_block_size`` -> ``oft_block_size`` (likewise), and ``module_dropout``, ``coft``,
``eps``, ``block_share``, ``use_cayley_neumann``, ``num_cayley_neumann_terms`` by the
same names; the tensor ``oft_R.weight`` ``(n or 1, b (b - 1) / 2)`` is this delta's
``skew``. PEFT moves a block size that does not divide a layer's features to a nearby one
with a warning; unipeft refuses it (:attr:`Method.size_check`) and lists the sizes that fit.

Sites: every projection layout: Linear, GPT-2 ``Conv1D``, convolutions (``groups=1``),
slices of fused projections (timm's ``qkv``, GPT-2's ``c_attn``, ``nn.MultiheadAttention``'s
``in_proj_weight``: the slice's rows of ``W`` are multiplied, the rotation is of the shared
input). Refused: grouped convolutions (the weight holds only ``in / groups`` of the input
channels the rotation is built over), convolutions padded otherwise than with zeros (the
change is run as a zero-padded convolution) and sites on a parallel path (``entry``), whose
input is another module's.
"""

from __future__ import annotations

import functools
import math
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

__all__ = [
    "OftConfig",
    "OftDelta",
    "block_dropout",
    "cayley",
    "divisors",
    "input_width",
    "rotate_blocks",
    "rotation_refusal",
    "skew_symmetric",
]


class OftConfig(DeltaConfig):
    """Give ``r`` or ``oft_block_size``, not both (``r × oft_block_size = d_in · k``);
    ``r`` alone clears the default block size."""

    r: int | None = Field(
        None,
        ge=1,
        le=1 << 20,
        description="number of orthogonal blocks per projection (d_in · k / r must be an "
        "integer >= 2); None: set by oft_block_size",
    )
    oft_block_size: int | None = Field(
        32,
        ge=2,
        le=1 << 20,
        description="size of each orthogonal block (must divide d_in · k); None: set by r",
    )
    module_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="in training, the share of blocks replaced by the identity",
    )
    coft: bool = Field(
        False, description="constrained OFT: keep each skew block within eps of zero"
    )
    eps: float = Field(
        6e-5,
        gt=0.0,
        le=1e6,
        description="COFT radius: ‖Q_i‖ <= eps / sqrt(number of blocks) (only with coft)",
    )
    block_share: bool = Field(False, description="one orthogonal block shared by all blocks")
    use_cayley_neumann: bool = Field(
        True,
        description="Cayley-Neumann series (matrix products only) instead of the exact "
        "Cayley transform (a solve)",
    )
    num_cayley_neumann_terms: int = Field(
        5,
        ge=2,
        le=64,
        description="terms of the Cayley-Neumann series (at least 2: one term is the "
        "identity, whatever the parameters, so nothing would train)",
    )

    @model_validator(mode="before")
    @classmethod
    def r_alone_clears_block_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("r") is not None and "oft_block_size" not in data:
            return {**data, "oft_block_size": None}
        return data

    @model_validator(mode="after")
    def one_size(self) -> OftConfig:
        if (self.r is None) == (self.oft_block_size is None):
            raise ValueError(
                f"set exactly one of 'r' ({self.r}) and 'oft_block_size' "
                f"({self.oft_block_size}): r × oft_block_size is the projection's input "
                "width, so one decides the other (set the other to None)"
            )
        return self


# ------------------------------------------------------------------ building blocks


def input_width(shape: ProjectionShape) -> int:
    """``d_in · k``: the features a projection's weight reads (a conv's flattened patch)."""
    return shape.in_features * math.prod(shape.kernel_size)


def divisors(n: int) -> list[int]:
    """The divisors of ``n``, ascending."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def skew_symmetric(vec: Tensor, size: int) -> Tensor:
    """``(p, size (size - 1) / 2)`` entries above the diagonal, row by row (the order of
    ``torch.triu_indices(size, size, 1)``) -> ``(p, size, size)`` ``Q`` with ``Qᵀ = -Q``."""
    rows, cols = _upper_indices(size, vec.device)
    upper = vec.new_zeros(vec.shape[0], size, size)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-1, -2)


@functools.lru_cache(maxsize=64)
def _upper_indices(size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The strict upper triangle's indices, made once per size and device (every forward
    needs them: building them each time costs a kernel launch per site and call)."""
    rows, cols = torch.triu_indices(size, size, 1, device=device)
    return rows, cols


@functools.lru_cache(maxsize=64)
def _identity(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.eye(size, dtype=dtype, device=device)


def cayley(q: Tensor, neumann_terms: int | None = None) -> Tensor:
    """Orthogonal ``(..., b, b)`` matrices from skew-symmetric ``q``: the exact Cayley
    transform ``(I - Q)(I + Q)⁻¹`` when ``neumann_terms`` is None, else PEFT's truncated
    series ``I + 2Q + ... + 2Q^(m-2) + Q^(m-1)`` with ``m`` terms (see the module doc)."""
    eye = _identity(q.shape[-1], q.dtype, q.device).expand_as(q)
    if neumann_terms is None:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    if neumann_terms == 1:
        return eye.clone()
    out = eye + 2.0 * q
    if neumann_terms == 2:
        return out
    power = q
    for _ in range(2, max(neumann_terms - 1, 3)):
        power = power @ q
        out = out + 2.0 * power
    return out + power @ q


def rotate_blocks(x: Tensor, blocks: Tensor) -> Tensor:
    """``x`` ``(..., n · b)`` times ``diag(blocks)`` as a row vector: block ``i`` of the
    last dimension becomes ``x_i @ blocks[i]``; a single block ``(1, b, b)`` serves all."""
    b = blocks.shape[-1]
    xs = x.reshape(*x.shape[:-1], x.shape[-1] // b, b)
    if blocks.shape[0] == 1:
        out = xs @ blocks[0]
    else:
        out = torch.einsum("...ik,ikc->...ic", xs, blocks)
    return out.reshape(x.shape)


def block_dropout(blocks: Tensor, p: float) -> Tensor:
    """``blocks`` ``(n, b, b)`` with ``floor(p · n)`` of them, chosen at random, replaced by
    the identity (multiplicative dropout; a single shared block is never dropped)."""
    n, b = blocks.shape[0], blocks.shape[-1]
    k = int(p * n)
    if n < 2 or k == 0:
        return blocks
    chosen = torch.randperm(n, device=blocks.device)[:k]
    mask = torch.zeros(n, 1, 1, dtype=blocks.dtype, device=blocks.device)
    mask[chosen] = 1.0
    eye = torch.eye(b, dtype=blocks.dtype, device=blocks.device)
    return blocks * (1.0 - mask) + eye * mask


def rotation_refusal(site: Site, method: str) -> str | None:
    """Why an input-rotating method cannot act at ``site`` (None if it can)."""
    if not isinstance(site, ModuleSite) or site.weight is None:
        return None
    if site.entry is not None:
        return (
            f"site {site.name!r} runs on the input of another module ({site.entry_path}), "
            f"but {method} rotates the projection's own input; target the projection itself"
        )
    if site.weight.layout != "conv":
        return None
    groups = getattr(site.module, "groups", 1)
    if groups != 1:
        return (
            f"site {site.name!r} is a grouped convolution (groups={groups}): its weight reads "
            f"only in/groups channels, and {method} rotates the whole input patch; target "
            "Linear projections or ungrouped convolutions"
        )
    mode = getattr(site.module, "padding_mode", "zeros")
    if mode != "zeros":
        return (
            f"site {site.name!r} is a convolution with padding_mode={mode!r}; {method}'s "
            "change of the weight is run as a zero-padded convolution, which would differ "
            "from the module's own padding at the borders. Target Linear projections, or "
            "convolutions with zero padding"
        )
    return None


# ------------------------------------------------------------------ the delta


class OftDelta(ReparameterizedDelta, FastPathParts):
    """``y + W (R - I)ᵀ x`` with ``R`` block-diagonal orthogonal (``W Rᵀ`` on a conv).

    ``skew``: ``(n or 1, b (b - 1) / 2)``, the upper triangles of the skew blocks (PEFT's
    ``oft_R.weight``). The base weight is read through the site (a plain attribute).
    """

    def __init__(
        self,
        site: ModuleSite,
        block_size: int,
        *,
        block_share: bool = False,
        coft: bool = False,
        eps: float = 6e-5,
        neumann_terms: int | None = 5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(ProjectionShape.of(site))
        self.site = site  # a plain attribute: nothing of the backbone is saved or moved
        width = input_width(self.shape)
        if block_size < 2 or width % block_size:
            raise ValueError(
                f"site {site.name!r}: an OFT block size of {block_size} does not tile its "
                f"{width} input features; use one of {[d for d in divisors(width) if d > 1]}"
            )
        self.block_size = block_size
        self.num_blocks = width // block_size
        self.coft, self.eps = coft, eps
        self.neumann_terms = neumann_terms
        self.dropout = dropout
        rows = 1 if block_share else self.num_blocks
        self.skew = nn.Parameter(torch.zeros(rows, block_size * (block_size - 1) // 2))

    # ------------------------------------------------------------------ the rotation

    @torch.no_grad()
    def constrain_(self) -> None:
        """COFT: scale every skew block whose Frobenius norm exceeds ``eps / sqrt(p)`` back
        onto that sphere, in the parameter itself (as PEFT does before each use)."""
        v = self.skew
        limit = self.eps / math.sqrt(v.shape[0])
        norm = math.sqrt(2.0) * torch.linalg.vector_norm(v, dim=1)  # ‖Q‖_F: each entry twice
        over = norm > limit * (1.0 + 1e-6)  # the slack keeps a projected block fixed
        if bool(over.any()):
            v.copy_(torch.where(over[:, None], v * (limit / norm.clamp_min(1e-30))[:, None], v))

    def blocks(self, drop: bool = False) -> Tensor:
        """The orthogonal blocks ``(n or 1, b, b)``, in float32 (or the parameters' dtype when
        wider); ``drop``: apply ``module_dropout``."""
        if self.coft:
            self.constrain_()
        dtype = torch.promote_types(self.skew.dtype, torch.float32)
        r = cayley(skew_symmetric(self.skew.to(dtype), self.block_size), self.neumann_terms)
        return block_dropout(r, self.dropout) if drop and self.dropout > 0 else r

    def rotated_weight(self, weight: Tensor) -> Tensor:
        """``W Rᵀ`` ``(out, d)`` for ``weight`` ``(out, in, *kernel)``, in float32 or wider."""
        r = self.blocks()
        w = weight.reshape(weight.shape[0], -1).to(r.dtype)
        return rotate_blocks(w, r.transpose(-1, -2))

    # ------------------------------------------------------------------ forward / merge

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        weight, _ = self.site.weight_views()
        r = self.blocks(drop=self.training)
        if self.shape.is_conv:
            w = weight.reshape(weight.shape[0], -1).to(r.dtype)
            dw = rotate_blocks(w, r.transpose(-1, -2)) - w
            change = self.shape.project(x, dw.reshape(weight.shape).to(x.dtype))
            return y + change.to(y.dtype)
        eye = _identity(self.block_size, r.dtype, r.device)
        u = rotate_blocks(x, (r - eye).to(x.dtype))  # x R - x, without the cancellation
        return y + F.linear(u, weight.to(x.dtype)).to(y.dtype)

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(W Rᵀ, b)`` for the ``weight`` given."""
        with torch.no_grad():
            new = self.rotated_weight(weight)
        return new.reshape(weight.shape).to(weight.dtype), bias

    def delta_weight(self) -> Tensor:
        """``W Rᵀ - W`` ``(out, in, *kernel)`` for the site's current weight (read it while
        the adapter is not merged: merged, the weight already holds ``W Rᵀ``)."""
        weight, _ = self.site.weight_views()
        with torch.no_grad():
            new = self.rotated_weight(weight)
            new = new - weight.reshape(weight.shape[0], -1).to(new.dtype)
        return new.reshape(weight.shape).to(self.skew.dtype)

    # ------------------------------------------------------------------ FastPath

    def fused_linear(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool
    ) -> Tensor | None:
        """``(x R) Wᵀ + b``: the whole output in one pass over ``W`` (``weight`` is
        ``(in, out)`` when ``transposed``, GPT-2's ``Conv1D``)."""
        if self.shape.is_conv:
            return None
        r = self.blocks(drop=self.training).to(x.dtype)
        return F.linear(rotate_blocks(x, r), weight.t() if transposed else weight, bias)


# ------------------------------------------------------------------ the method record


def block_size_of(cfg: OftConfig, width: int) -> int:
    """The block size ``cfg`` gives a projection reading ``width`` features."""
    if cfg.oft_block_size is not None:
        return cfg.oft_block_size
    assert cfg.r is not None
    return width // cfg.r


def _build(cfg: OftConfig, site: Site) -> OftDelta:
    assert isinstance(site, ModuleSite)
    width = input_width(ProjectionShape.of(site))
    return OftDelta(
        site,
        block_size_of(cfg, width),
        block_share=cfg.block_share,
        coft=cfg.coft,
        eps=cfg.eps,
        neumann_terms=cfg.num_cayley_neumann_terms if cfg.use_cayley_neumann else None,
        dropout=cfg.module_dropout,
    )


def _count(cfg: OftConfig, site: Site) -> int:
    width = input_width(ProjectionShape.of(site))  # type: ignore[arg-type]
    b = block_size_of(cfg, width)
    rows = 1 if cfg.block_share else width // b
    return rows * (b * (b - 1) // 2)


def _listed(values: list[int]) -> str:
    shown = ", ".join(str(v) for v in values[:24])
    return shown + (", ..." if len(values) > 24 else "") if values else "none"


def _size_check(cfg: OftConfig, site: Site) -> str | None:
    if getattr(site, "weight", None) is None:
        return None
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    width = input_width(shape)
    what = f"the {width} input features"
    if shape.is_conv:
        what += f" ({shape.in_features} channels x {math.prod(shape.kernel_size)} kernel elements)"
    if cfg.r is not None:
        if width % cfg.r == 0 and width // cfg.r >= 2:
            return None
        valid = [d for d in divisors(width) if width // d >= 2]
        return (
            f"r={cfg.r} blocks cannot tile {what} of this projection with square blocks of "
            f"size >= 2: r must divide {width} and leave blocks of at least 2. Valid r: "
            f"{_listed(valid)} (or set oft_block_size instead)"
        )
    b = cfg.oft_block_size
    assert b is not None
    if width % b == 0:
        return None
    valid = [d for d in divisors(width) if d >= 2]
    return (
        f"oft_block_size={b} does not divide {what} of this projection, which OFT tiles "
        f"with square blocks. Valid oft_block_size: {_listed(valid)}"
    )


def _accepts(cfg: OftConfig, site: Site) -> str | None:
    return rotation_refusal(site, "OFT")


METHOD = Method(
    id="oft",
    refuses=(
        "sites that run on another module's input; a block size that does not divide a "
        "site's input width"
    ),
    family="reparameterized",
    config=OftConfig,
    build=_build,
    num_parameters=_count,
    formula="(d / b or 1 with block_share) · b (b - 1) / 2 per projection (d = d_in · k, "
    "k: kernel elements, 1 for Linear; b: the block size, d / r when r is given)",
    site_kinds=("projection",),
    accepts=_accepts,
    size_check=_size_check,
    default_targets=("attn.q", "attn.v"),
    budget_field=None,
    mergeable=True,
    identity_at_init=True,
    paper="Qiu et al., Controlling Text-to-Image Diffusion by Orthogonal Finetuning, 2023, "
    "arXiv:2306.07280",
    summary="the projection's input rotated by a block-diagonal orthogonal matrix (Cayley "
    "transform of skew-symmetric blocks); mergeable",
)
