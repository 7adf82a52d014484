"""(IA)^3: learned channel-wise rescaling of activations (Liu et al., 2022).

(IA)^3 ("Infused Adapter by Inhibiting and Amplifying Inner Activations") multiplies
activations by learned vectors, one value per channel. At a projection ``y = W x + b`` it
takes one of two forms, chosen per site by the config field ``feedforward``:

- output side (keys, values): ``y' = l ⊙ y = (diag(l) W) x + l ⊙ b``, ``l`` ``(d_out,)``;
  merged: the rows of ``W`` and ``b`` are scaled;
- input side (the feed-forward form): ``y' = W (l ⊙ x) + b = y + W ((l - 1) ⊙ x)``,
  ``l`` ``(d_in,)``; merged: the columns of ``W`` are scaled, ``b`` is unchanged.

The default targets are the paper's: the keys (``attn.k``), the values (``attn.v``) and the
FFN's hidden activation after its nonlinearity, ``W2 (l ⊙ γ(W1 x))``, which is the input
side of ``mlp.down`` (``feedforward="mlp.down"``). Every ``l`` starts at ``init``; with the
default 1.0 the model is unchanged at initialisation. The input side reads the site's live
weight (``site.weight_views()``, kept as a plain attribute) to compute ``W ((l - 1) ⊙ x)``;
an adapter merged into the same weight is part of it. On a convolution, ``l`` scales the
input channels (``d_in``: the convolution's input channels). On a slice of a fused
projection (``attn.k`` of timm's ``qkv``), only the slice's output rows see the scaled input.
Nothing is shared between sites.

Paper: Liu et al., *Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning*, 2022, arXiv:2205.05638.

PEFT equivalent: ``peft_type="IA3"`` (``IA3Config``). ``feedforward`` plays the part of
``feedforward_modules`` (PEFT's default for Llama is ``down_proj``, for BERT
``output.dense``: ``mlp.down``); ``init`` 1.0 is ``init_ia3_weights=True``. PEFT saves
``ia3_l`` ``(d_out, 1)`` on the output side and ``(1, d_in)`` on the input side (a
convolution: ``(1, C, 1, ...)``); the codec in ``unipeft.features.interop.codecs.ia3``
converts both.

Sites: projections of every layout (Linear, GPT-2 ``Conv1D``, convolutions, and the slices
of fused projections: timm's ``qkv``, GPT-2's ``c_attn``, ``nn.MultiheadAttention``'s
``in_proj_weight``). Refused: module sites without a weight and sublayer paths (their
output is not one projection's, so the scale could not be folded into a weight).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import AdditiveDelta, ProjectionShape
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site

DEFAULT_TARGETS = ("attn.k", "attn.v", "mlp.down")


class Ia3Config(DeltaConfig):
    """Where the scales start, and which sites scale their input instead of their output."""

    init: float = Field(
        1.0,
        gt=0,
        le=10,
        description="initial value of every scale; 1.0 makes the adapter the identity at init",
    )
    feedforward: str = Field(
        "mlp.down",
        description="sites whose INPUT is scaled (PEFT's feedforward_modules): a role, or a "
        "regex full-matched against the site's role, name and module path; several joined "
        "with '|' (a list of them is joined so); '' scales every site's output",
    )

    @field_validator("feedforward", mode="before")
    @classmethod
    def _join(cls, value: Any) -> Any:
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return "|".join(v for v in value if v)
        return value

    @field_validator("feedforward")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regex ({exc}); give roles or regexes") from None
        return value


def is_feedforward(pattern: str, site: Site) -> bool:
    """Whether ``pattern`` (:attr:`Ia3Config.feedforward`) selects ``site``'s input side."""
    if not pattern or not isinstance(site, ModuleSite):
        return False
    rx = re.compile(pattern)
    return any(s is not None and rx.fullmatch(s) for s in (site.role, site.name, site.path))


def _along(v: Tensor, ndim: int, dim: int, dtype: torch.dtype) -> Tensor:
    """``v`` shaped to broadcast along axis ``dim`` of an ``ndim``-d tensor."""
    shape = [1] * ndim
    shape[dim] = -1
    return v.to(dtype).view(shape)


class Ia3Delta(AdditiveDelta):
    """Output side: ``y ⊙ l``, one scale per output channel of a projection (of its slice).

    It belongs to the additive family (new parameters beside the frozen backbone) but acts
    multiplicatively, so it overrides ``forward`` instead of implementing ``transform``.
    """

    def __init__(self, features: int, init: float = 1.0, channel_dim: int = -1) -> None:
        super().__init__(placement="serial", scaling=1.0, channel_dim=channel_dim)
        self.l = nn.Parameter(torch.full((features,), float(init)))

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        return y * _along(self.l, y.ndim, self.channel_dim, y.dtype)

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        # diag(l) (W x + b) = (diag(l) W) x + l ⊙ b: the rows of the canonical
        # (out, in, *kernel) weight, and the bias; a missing bias stays missing
        new_weight = weight * _along(self.l, weight.ndim, 0, weight.dtype)
        return new_weight, None if bias is None else bias * self.l.to(bias.dtype)


class Ia3InputDelta(AdditiveDelta):
    """Input side (feed-forward form): ``W (l ⊙ x) + b = y + W ((l - 1) ⊙ x)``, one scale per
    input channel. ``W`` is read through the site (a plain attribute: not saved)."""

    def __init__(self, site: ModuleSite, init: float = 1.0) -> None:
        super().__init__(placement="parallel", scaling=1.0, channel_dim=site.channel_dim)
        self.shape = ProjectionShape.of(site)
        self.site = site
        self.l = nn.Parameter(torch.full((self.shape.in_features,), float(init)))

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        if x is None:
            raise RuntimeError("input-side (IA)^3 needs the projection's input, not captured")
        weight, _ = self.site.weight_views()
        dim = 1 if self.shape.is_conv else -1
        scaled = x * _along(self.l - 1, x.ndim, dim, x.dtype)
        return y + self.shape.project(scaled, weight.to(x.dtype)).to(y.dtype)

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        # W (l ⊙ x) = (W diag(l)) x: the columns of the canonical weight; b is unchanged
        return weight * _along(self.l, weight.ndim, 1, weight.dtype), bias


def _build(cfg: Ia3Config, site: Site) -> Ia3Delta | Ia3InputDelta:
    assert isinstance(site, ModuleSite)
    if is_feedforward(cfg.feedforward, site):
        return Ia3InputDelta(site, cfg.init)
    return Ia3Delta(site.features, cfg.init, site.channel_dim)


def _count(cfg: Ia3Config, site: Site) -> int:
    assert isinstance(site, ModuleSite)
    if is_feedforward(cfg.feedforward, site):
        return ProjectionShape.of(site).in_features
    return site.features


def _accepts(cfg: Ia3Config, site: Site) -> str | None:
    # a sublayer path's output is not one projection's rows, so it could not be merged
    if not isinstance(site, ModuleSite) or site.entry is not None or site.weight is None:
        return (
            f"{site.name!r} is not a single projection; ia3 scales a projection's output or "
            "input. Target projections such as attn.k, attn.v or mlp.down"
        )
    if site.features <= 0:
        return f"the width of {site.name!r}'s output is unknown"
    return None


def _identity(cfg: Ia3Config) -> bool:
    return cfg.init == 1.0


METHOD = Method(
    id="ia3",
    refuses="nothing beyond non-projection sites",
    family="additive",
    config=Ia3Config,
    build=_build,
    num_parameters=_count,
    formula="d_out per projection (one scale per output channel, or per channel of its "
    "slice); d_in at the feed-forward sites, whose input is scaled",
    site_kinds=("projection",),
    default_targets=DEFAULT_TARGETS,
    mergeable=True,
    identity_at_init=_identity,
    paper="Liu et al., Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than "
    "In-Context Learning, 2022, arXiv:2205.05638",
    summary="learned channel-wise scaling of keys, values (outputs) and the FFN's hidden "
    "activation (the input of mlp.down); mergeable",
    accepts=_accepts,
)
