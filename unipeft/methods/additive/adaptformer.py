"""AdaptFormer: a scaled bottleneck MLP beside a block's MLP (Chen et al., 2022).

AdaptMLP runs in parallel with the frozen MLP sublayer of a transformer block, on the same
input ``h`` (the normed tokens the MLP reads), and its output is scaled and added to the
MLP's output before the residual sum:

    y' = MLP(h) + s · W_up ReLU(W_down h + b_down) + s · b_up

``W_down`` ``(b, d)``, ``W_up`` ``(d, b)``, ``b`` the bottleneck width (the paper's 64), ``s``
the scale (the paper's 0.1, or a learned scalar starting at 1 with
``learnable_scale=True``). Dropout (``dropout``, the code's 0.1) acts on the hidden
activation during training. ``W_down`` starts Kaiming-uniform (the code's "lora" init), the
biases and ``W_up`` at zero: the adapter starts as the identity. ``layernorm="in"`` or
``"out"`` adds the code's optional LayerNorm on the adapter's input or output (``2 d``
parameters; its output form is taken after the scale, as there).

The paper's Eq. 3-4 feed AdaptMLP with ``LN(x')``, the MLP's own input, which is what the
``mlp`` site gives here; the released code feeds it the residual stream before the norm.

Paper: Chen, Ge, Tong, Wang, Song, Wang, Luo, *AdaptFormer: Adapting Vision Transformers for
Scalable Visual Recognition*, NeurIPS 2022, arXiv:2205.13535.

Shared across sites: nothing. PEFT equivalent: none (PEFT has no AdaptFormer type).

Sites: the default is every block's MLP (role ``mlp``, on text models too: a parallel
adapter beside a BERT or Llama MLP is the same construction). Any other module site whose
input and output carry channels last works the same way (``attn``, ``block``, a projection:
the adapter maps its input width to its output width). Refused: convolutions (their input
and output are spatial maps of different sizes, not tokens) and sites of unknown width.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import AdditiveDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site


class AdaptFormerConfig(DeltaConfig):
    """AdaptMLP's fields (the paper's values as defaults)."""

    bottleneck: int = Field(64, ge=1, le=65536, description="hidden width b of AdaptMLP")
    scale: float = Field(
        0.1,
        gt=0.0,
        le=100.0,
        description="factor s on AdaptMLP's output (ignored when learnable_scale is set)",
    )
    learnable_scale: bool = Field(
        False, description="learn s as one trainable scalar per site, starting at 1.0"
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on the hidden activation")
    layernorm: Literal["none", "in", "out"] = Field(
        "none",
        description="none (the paper's setting); in: a LayerNorm on AdaptMLP's input; out: on "
        "its scaled output",
    )


class AdaptFormerDelta(AdditiveDelta):
    """``y + s · up(dropout(relu(down(h))))`` with ``h`` the site's input (parallel)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        cfg: AdaptFormerConfig,
    ) -> None:
        super().__init__(placement="parallel", scaling=1.0)
        self.down = nn.Linear(in_features, cfg.bottleneck)
        self.up = nn.Linear(cfg.bottleneck, out_features)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fixed_scale = cfg.scale
        self.learned_scale = nn.Parameter(torch.ones(())) if cfg.learnable_scale else None
        self.layernorm = cfg.layernorm
        width = in_features if cfg.layernorm == "in" else out_features
        self.norm = nn.LayerNorm(width) if cfg.layernorm != "none" else None
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def transform(self, h: Tensor) -> Tensor:
        if self.norm is not None and self.layernorm == "in":
            h = self.norm(h)
        out = self.up(self.dropout(F.relu(self.down(h))))
        s = self.learned_scale if self.learned_scale is not None else self.fixed_scale
        out = out * s
        if self.norm is not None and self.layernorm == "out":
            out = self.norm(out)
        return out


def _dims(site: ModuleSite) -> tuple[int, int]:
    # a projection reads in_features; a sublayer or block reads tokens of its output width
    return (site.in_features or site.features), site.features


def _accepts(cfg: AdaptFormerConfig, site: Site) -> str | None:
    if not isinstance(site, ModuleSite):
        return f"{site.name!r} is a token sequence; AdaptFormer runs beside a module"
    if site.channel_dim != -1 or (site.weight is not None and site.weight.layout == "conv"):
        return (
            f"{site.name!r} is a convolution site: its input and output are spatial maps, not "
            "tokens with channels last. Target the blocks' MLPs (mlp) or other token sites"
        )
    if site.features <= 0:
        return f"the width of {site.name!r}'s output is unknown"
    return None


def _build(cfg: AdaptFormerConfig, site: Site) -> AdaptFormerDelta:
    assert isinstance(site, ModuleSite)
    d_in, d_out = _dims(site)
    return AdaptFormerDelta(d_in, d_out, cfg)


def _count(cfg: AdaptFormerConfig, site: Site) -> int:
    assert isinstance(site, ModuleSite)
    d_in, d_out = _dims(site)
    b = cfg.bottleneck
    n = d_in * b + b + b * d_out + d_out
    n += 1 if cfg.learnable_scale else 0
    if cfg.layernorm != "none":
        n += 2 * (d_in if cfg.layernorm == "in" else d_out)
    return n


METHOD = Method(
    id="adaptformer",
    family="additive",
    config=AdaptFormerConfig,
    build=_build,
    num_parameters=_count,
    formula="d_in · b + b + b · d_out + d_out per site (b: bottleneck; d_in = d_out = d at an "
    "mlp site), + 1 with learnable_scale, + 2 d with a LayerNorm",
    site_kinds=("module",),
    accepts=_accepts,
    refuses="convolution sites (spatial maps, not tokens) and sites of unknown width",
    default_targets=("mlp",),
    budget_field="bottleneck",
    mergeable=False,
    identity_at_init=True,
    paper="Chen et al., AdaptFormer: Adapting Vision Transformers for Scalable Visual "
    "Recognition, NeurIPS 2022, arXiv:2205.13535",
    summary="a scaled bottleneck MLP (down, ReLU, up) in parallel with each block's MLP",
)

__all__ = ["METHOD", "AdaptFormerConfig", "AdaptFormerDelta"]
