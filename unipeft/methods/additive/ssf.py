"""SSF: scale and shift the features after an operation (Lian et al., 2022).

SSF ("Scaling & Shifting your Features") follows an operation ``y = op(x)`` with a learned
per-channel affine map

    y' = γ ⊙ y + β          γ, β: (d,), one value per output channel

where the paper inserts it after every linear layer of a ViT block (the fused ``qkv``, the
attention's output projection, ``fc1``, ``fc2``), after the two LayerNorms and after the
patch embedding. Because ``y`` is an affine function of ``x`` there, the map folds into the
preceding operation at inference (re-parameterisation):

    projection:  W' = diag(γ) W,  b' = γ ⊙ b + β        (rows of the canonical (out, in, *k))
    affine norm: w' = γ ⊙ w,      b' = γ ⊙ b + β

so ``merge()`` writes it into the weights and the adapted model costs nothing at inference.
With ``init="identity"`` (the default) ``γ = 1`` and ``β = 0``: the adapter starts as the
identity. ``init="normal"`` is the official code's start, ``γ ~ N(1, σ²)``, ``β ~ N(0, σ²)``
with ``σ = init_std`` (0.02 in the paper), which is not the identity.

Default targets: every projection of a block (``attn.q``, ``attn.k``, ``attn.v`` — a per
channel map on the slices of a fused ``qkv`` is the same as one on the whole output —
``attn.out``, ``mlp.up``, ``mlp.gate`` where there is one, ``mlp.down``), the norms, and the
patch embedding of vision towers (both optional: taken where SSF can attach).

Paper: Lian, Zhou, Feng, Wang, *Scaling & Shifting Your Features: A New Baseline for
Efficient Model Tuning*, NeurIPS 2022, arXiv:2210.08823.

Shared across sites: nothing. PEFT equivalent: none (PEFT has no SSF type; (IA)³ on the
output side is SSF without the shift).

Sites: projections of every layout (``nn.Linear``, GPT-2 ``Conv1D``, convolutions with
channels on dim 1, fused q/k/v slices, ``nn.MultiheadAttention`` in_proj slices) and affine
norms with a bias (LayerNorm). Refused: module sites that are not a single projection or
norm (a sublayer path, a block, an embedding table), whose output could not be folded into
a weight; and norms without a bias (RMSNorm), where the shift β could not be merged.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import AdditiveDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site

DEFAULT_TARGETS = (
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.out",
    "mlp.up",
    "mlp.gate?",
    "mlp.down",
    "norm?",
    "embed?",
)


class SsfConfig(DeltaConfig):
    """How SSF's scale and shift start."""

    init: Literal["identity", "normal"] = Field(
        "identity",
        description="identity: γ = 1, β = 0 (the adapter starts as the identity); normal: "
        "the paper's code, γ ~ N(1, init_std²), β ~ N(0, init_std²)",
    )
    init_std: float = Field(
        0.02, gt=0.0, le=1.0, description="standard deviation of the normal init (init='normal')"
    )


def _along(v: Tensor, ndim: int, dim: int, dtype: torch.dtype) -> Tensor:
    """``v`` shaped to broadcast along axis ``dim`` of an ``ndim``-d tensor."""
    shape = [1] * ndim
    shape[dim] = -1
    return v.to(dtype).view(shape)


class SsfDelta(AdditiveDelta):
    """``γ ⊙ y + β`` along the site's channel dimension. Additive family (new parameters
    beside the frozen backbone) acting affinely, so it overrides ``forward``."""

    def __init__(
        self,
        features: int,
        init: str = "identity",
        init_std: float = 0.02,
        channel_dim: int = -1,
    ) -> None:
        super().__init__(placement="serial", scaling=1.0, channel_dim=channel_dim)
        self.scale = nn.Parameter(torch.ones(features))
        self.shift = nn.Parameter(torch.zeros(features))
        if init == "normal":
            with torch.no_grad():
                nn.init.normal_(self.scale, mean=1.0, std=init_std)
                nn.init.normal_(self.shift, mean=0.0, std=init_std)

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        dim = self.channel_dim
        gamma = _along(self.scale, y.ndim, dim, y.dtype)
        return torch.addcmul(_along(self.shift, y.ndim, dim, y.dtype), y, gamma)

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        # γ ⊙ (W x + b) + β = (diag(γ) W) x + (γ ⊙ b + β): rows of the canonical weight (a
        # norm's 1-D scale is scaled the same way); a missing bias is created
        gamma = self.scale.to(weight.dtype)
        new_weight = weight * _along(gamma, weight.ndim, 0, weight.dtype)
        shift = self.shift.to(weight.dtype)
        new_bias = shift if bias is None else torch.addcmul(shift, bias, gamma.to(bias.dtype))
        return new_weight, new_bias


def _accepts(cfg: SsfConfig, site: Site) -> str | None:
    if not isinstance(site, ModuleSite):
        return f"{site.name!r} is a token sequence; SSF scales and shifts a module's output"
    why = site.merge_refusal()
    if why is not None:
        return (
            f"{why}: SSF attaches where its scale and shift fold into the weights (a "
            "projection, a convolution or an affine norm). Target projections (attn.q, "
            "attn.out, mlp.up, mlp.down...) or norms instead"
        )
    if site.weight is None and site.parameter("bias") is None:
        return (
            f"norm site {site.name!r} ({type(site.module).__name__}) has no bias, so SSF's "
            "shift could not be merged into it; target the projections (or norms with a bias)"
        )
    if site.features <= 0:
        return f"the width of {site.name!r}'s output is unknown"
    return None


def _build(cfg: SsfConfig, site: Site) -> SsfDelta:
    assert isinstance(site, ModuleSite)
    return SsfDelta(site.features, cfg.init, cfg.init_std, site.channel_dim)


def _count(cfg: SsfConfig, site: Site) -> int:
    assert isinstance(site, ModuleSite)
    return 2 * site.features


METHOD = Method(
    id="ssf",
    family="additive",
    config=SsfConfig,
    build=_build,
    num_parameters=_count,
    formula="2 · d_out per site (a scale γ and a shift β per output channel)",
    site_kinds=("module",),
    accepts=_accepts,
    refuses="module sites that are not a projection, a convolution or an affine norm (sublayer "
    "paths, blocks, embedding tables) and norms without a bias (RMSNorm): SSF attaches only "
    "where it merges",
    default_targets=DEFAULT_TARGETS,
    mergeable=True,
    identity_at_init=lambda cfg: cfg.init == "identity",
    paper="Lian, Zhou, Feng, Wang, Scaling & Shifting Your Features: A New Baseline for "
    "Efficient Model Tuning, NeurIPS 2022, arXiv:2210.08823",
    summary="a learned per-channel scale and shift after projections and norms; mergeable "
    "into the preceding projection or norm",
)

__all__ = ["METHOD", "SsfConfig", "SsfDelta"]
