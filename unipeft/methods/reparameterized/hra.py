"""HRA: the projection's weight multiplied by a chain of Householder reflections.

Yuan et al., 2024. With ``r`` vectors ``u_i`` of the projection's (flattened) input space,
``d = d_in · k`` (``k``: kernel elements, 1 for a Linear), each normalised to unit length,

    H = (I - 2 u_0 u_0ᵀ) (I - 2 u_1 u_1ᵀ) ... (I - 2 u_{r-1} u_{r-1}ᵀ)        W' = W H
    y' = W' x + b = y + W (H - I) x

With ``apply_gs`` the vectors are first orthonormalised (Gram–Schmidt, as a reduced QR),
and the product collapses to ``H = I - 2 Q Qᵀ``.

The product is never formed as a ``d × d`` matrix. A chain of reflections has the compact
form ``H = I - U T Uᵀ`` with ``T`` ``(r, r)`` upper triangular and ``T⁻¹ = striu(UᵀU) + I/2``
(Schreiber & Van Loan, 1989; Puglisi, 1992), so ``W (H - I) = -(W U) T Uᵀ``: a rank-``r``
update with ``B = -W U`` ``(out, r)`` and ``A = T Uᵀ`` ``(r, d)``, computed from the site's
frozen weight (read through :meth:`ModuleSite.weight_views`, the site kept as a plain
attribute) and ``r × r`` work. Everything is computed in float32 (float64 on a float64
backbone) and cast to the output's dtype.

Initialisation (``init="symmetric"``, PEFT's default): the vectors come in equal pairs, so
each pair of reflections cancels and the adapter starts as the identity. That needs an even
``r`` and no Gram–Schmidt (a repeated vector has no orthogonal part); otherwise, as in PEFT
for an odd ``r``, every vector is drawn at random (kaiming-uniform) and the adapter does
not start as the identity.

Nothing is shared across sites.

PEFT equivalent: ``peft_type="HRA"``: ``r`` -> ``r``, ``apply_GS`` -> ``apply_gs``,
``init_weights`` True/False -> ``init`` "symmetric"/"random"; the tensor ``hra_u``
``(d_in · k, r)`` is this delta's ``u``. PEFT adapts ``nn.Linear`` and ``nn.Conv2d`` only.

Sites: every projection layout: Linear, GPT-2 ``Conv1D``, convolutions (over the flattened
``(in, *kernel)`` input patch), and slices of fused projections (timm's ``qkv``, GPT-2's
``c_attn``, ``nn.MultiheadAttention``'s ``in_proj_weight``), where the slice's rows of the
weight are multiplied. Sites without a weight are refused (by ``site_kinds``): there is
nothing to multiply; so are convolutions padded other than with zeros (the update runs as a
zero-padded convolution).
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
from ...contract.sites import ModuleSite, Site


class HraConfig(DeltaConfig):
    r: int = Field(8, ge=1, le=4096, description="number of Householder reflections")
    apply_gs: bool = Field(
        False,
        description="orthonormalise the reflection vectors (Gram-Schmidt) before use, so "
        "the product is I - 2 Q Qᵀ",
    )
    init: Literal["symmetric", "random"] = Field(
        "symmetric",
        description="symmetric: vectors in equal pairs, so the adapter starts as the "
        "identity (needs an even r and apply_gs=False, else random); random: "
        "kaiming-uniform vectors",
    )


def _symmetric(config: HraConfig) -> bool:
    """Whether the config's init makes the adapter the identity at init."""
    return config.init == "symmetric" and config.r % 2 == 0 and not config.apply_gs


def _width(shape: ProjectionShape) -> int:
    """``d_in · k``: the length of a reflection vector."""
    return shape.in_features * math.prod(shape.kernel_size)


class HraDelta(ReparameterizedDelta):
    """``y + W (H - I) x`` with ``H`` the product of ``r`` Householder reflections.

    ``u``: ``(d_in · k, r)``, one (unnormalised) reflection vector per column, PEFT's layout.
    """

    def __init__(self, site: ModuleSite, r: int, apply_gs: bool, symmetric: bool) -> None:
        super().__init__(ProjectionShape.of(site))
        self.site = site  # a plain attribute: nothing of the backbone is saved or moved
        self.r = r
        self.apply_gs = apply_gs
        weight, _ = site.weight_views()
        if weight.shape[0] != self.shape.out_features:
            raise ValueError(
                f"site {site.name!r}: its weight has {weight.shape[0]} output rows but the "
                f"site's output has {self.shape.out_features} channels"
            )
        d = _width(self.shape)
        if symmetric:
            half = torch.empty(d, r // 2)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            u = half.repeat_interleave(2, dim=1)  # columns 2i and 2i+1 equal: H_2i H_2i+1 = I
        else:
            u = torch.empty(d, r)
            nn.init.kaiming_uniform_(u, a=math.sqrt(5))
        self.u = nn.Parameter(u)

    # ------------------------------------------------------------------ the reflections

    def _dtype(self, like: Tensor) -> torch.dtype:
        return torch.promote_types(torch.promote_types(self.u.dtype, like.dtype), torch.float32)

    def factors(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, A)`` with ``W (H - I) = B A`` for ``weight`` ``(out, in, *kernel)``:
        ``B = -W U`` ``(out, r)``, ``A = T Uᵀ`` ``(r, d)``, in float32 or wider."""
        dtype = self._dtype(weight)
        u = self.u.to(dtype)
        if self.apply_gs:
            q, _ = torch.linalg.qr(u, mode="reduced")  # span and projector of Gram-Schmidt
            a = 2.0 * q.t()
            cols = q
        else:
            cols = u / torch.linalg.vector_norm(u, dim=0)
            gram = cols.t() @ cols
            eye = torch.eye(self.r, dtype=dtype, device=u.device)
            t_inv = torch.triu(gram, diagonal=1) + 0.5 * eye
            t = torch.linalg.solve_triangular(t_inv, eye, upper=True)
            a = t @ cols.t()
        w = weight.reshape(weight.shape[0], -1).to(dtype)
        return -(w @ cols), a

    def _update(self, weight: Tensor) -> Tensor:
        """``W (H - I)`` ``(out, d)`` for ``weight``, in float32 or wider."""
        b, a = self.factors(weight)
        return b @ a

    # ------------------------------------------------------------------ forward / merge

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        weight, _ = self.site.weight_views()
        if self.shape.is_conv:
            dw = self._update(weight).reshape(weight.shape).to(x.dtype)
            return y + self.shape.project(x, dw).to(y.dtype)
        b, a = self.factors(weight)
        h = x.reshape(-1, x.shape[-1]).to(a.dtype) @ a.t()  # (N, r)
        return torch.addmm(y.reshape(-1, y.shape[-1]), h.to(y.dtype), b.t().to(y.dtype)).reshape(
            y.shape
        )

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(W H, b)`` for the ``weight`` given."""
        with torch.no_grad():
            dw = self._update(weight)
            new = weight.reshape(weight.shape[0], -1).to(dw.dtype) + dw
        return new.reshape(weight.shape).to(weight.dtype), bias

    def delta_weight(self) -> Tensor:
        """``W H - W`` ``(out, in, *kernel)`` for the site's current weight (read it while
        the adapter is not merged: merged, the weight already holds ``W H``)."""
        weight, _ = self.site.weight_views()
        with torch.no_grad():
            dw = self._update(weight)
        return dw.reshape(weight.shape).to(self.u.dtype)


def _build(cfg: HraConfig, site: Site) -> HraDelta:
    assert isinstance(site, ModuleSite)
    return HraDelta(site, cfg.r, cfg.apply_gs, _symmetric(cfg))


def _count(cfg: HraConfig, site: Site) -> int:
    return cfg.r * _width(ProjectionShape.of(site))  # type: ignore[arg-type]


def _accepts(cfg: HraConfig, site: Site) -> str | None:
    if not isinstance(site, ModuleSite) or site.weight is None or site.weight.layout != "conv":
        return None
    mode = getattr(site.module, "padding_mode", "zeros")
    if mode != "zeros":
        return (
            f"{site.name!r} is a convolution with padding_mode={mode!r}; HRA's update is run "
            "as a zero-padded convolution, which would differ from the module's own padding "
            "at the borders. Target Linear projections, or convolutions with zero padding"
        )
    return None


def _size_check(cfg: HraConfig, site: Site) -> str | None:
    if getattr(site, "weight", None) is None:
        return None
    d = _width(ProjectionShape.of(site))  # type: ignore[arg-type]
    if cfg.r <= d:
        return None
    return (
        f"r={cfg.r} Householder reflections of the {d}-dimensional input of this projection "
        f"are more than its {d} dimensions (the extra ones cannot change the product, and "
        f"Gram-Schmidt cannot orthonormalise them). Choose r <= {d}"
    )


METHOD = Method(
    id="hra",
    refuses="convolutions padded other than with zeros (not projections); r above d_in · k",
    family="reparameterized",
    config=HraConfig,
    build=_build,
    num_parameters=_count,
    formula="r · d_in · k per projection (k: kernel elements, 1 for Linear)",
    site_kinds=("projection",),
    default_targets=("attn.q", "attn.v"),
    budget_field="r",
    mergeable=True,
    identity_at_init=_symmetric,
    paper="Yuan et al., Bridging The Gap between Low-rank and Orthogonal Adaptation via "
    "Householder Reflection Adaptation, 2024, arXiv:2405.17484",
    summary="the weight multiplied by a product of r Householder reflections of its input "
    "space; mergeable",
    accepts=_accepts,
    size_check=_size_check,
)
