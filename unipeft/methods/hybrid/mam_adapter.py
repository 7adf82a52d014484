"""MAM adapter, the Mix-and-Match adapter of He et al. (2022), "Towards a Unified View of
Parameter-Efficient Transfer Learning": prefix tuning on attention plus a scaled parallel
adapter on the feed-forward sublayer.

- **Attention**: ``P`` learned keys and values prepended in every attention layer
  (:mod:`unipeft.methods.additive.prefix_tuning`, own parameters per site, no
  reparameterisation MLP): the paper's small prefix (``l = 30``). On Hugging Face text
  models the prefixes enter at the ``tokens`` site as a key/value cache of ``P`` positions;
  on vision towers (timm, Hugging Face ViT / VideoMAE, open_clip's ``nn.MultiheadAttention``)
  at each ``attn`` site.
- **FFN**: ``h ← h + s · up(ReLU(down(x)))`` beside each ``mlp`` sublayer, reading the
  sublayer's input ``x``: the paper's large bottleneck (``r = 512``) and scale ``s = 4``.
  ``up`` starts at zero, so this part starts as the identity.

Shares nothing across sites. No PEFT equivalent (PEFT has no MAM adapter; its prefix part
alone is ``PREFIX_TUNING``). Refused: ``attn`` sites of Hugging Face text models (their
prefix goes through the cache: target ``tokens``), the ``tokens`` site of vision towers
(target ``attn``), convolution sites and sites of unknown width for the adapter.
Not the identity at init (the prefix takes attention mass); not mergeable.
"""

from __future__ import annotations

from pydantic import Field

from ...contract.config import DeltaConfig
from ...contract.deltas import DeltaModule
from ...contract.method import Method
from ...contract.sites import ModuleSite, SequenceSite, Site
from ..additive.bottleneck_adapter import BottleneckAdapterDelta
from ..additive.prefix_tuning import (
    build_prefix,
    prefix_parameters,
    prefix_refusal,
    prefix_size_refusal,
)


class MAMAdapterConfig(DeltaConfig):
    prefix_tokens: int = Field(
        30, ge=1, le=1024, description="prefix length l: keys and values per attention layer"
    )
    bottleneck: int = Field(
        512, ge=1, le=65536, description="r, the width of the parallel FFN adapter"
    )
    scaling: float = Field(4.0, gt=0, le=100, description="s, the factor on the adapter's output")
    prefix_init_std: float = Field(1.0, gt=0, le=10, description="std of the prefixes' init")
    init_std: float = Field(
        0.01, gt=0, le=1, description="std of the adapter's down projection (up starts at 0)"
    )


def _is_prefix_site(site: Site) -> bool:
    return isinstance(site, SequenceSite) or site.role == "attn"


def _adapter_dims(site: ModuleSite) -> tuple[int, int]:
    return (site.in_features or site.features), site.features


def _build(cfg: MAMAdapterConfig, site: Site) -> DeltaModule:
    if _is_prefix_site(site):
        return build_prefix(cfg.prefix_tokens, cfg.prefix_init_std, site)
    assert isinstance(site, ModuleSite)
    d_in, d_out = _adapter_dims(site)
    return BottleneckAdapterDelta(
        d_in,
        d_out,
        cfg.bottleneck,
        placement="parallel",
        activation="relu",
        scaling=cfg.scaling,
        init_std=cfg.init_std,
        channel_dim=site.channel_dim,
    )


def _count(cfg: MAMAdapterConfig, site: Site) -> int:
    if _is_prefix_site(site):
        return prefix_parameters(cfg.prefix_tokens, site)
    assert isinstance(site, ModuleSite)
    d_in, d_out = _adapter_dims(site)
    return d_in * cfg.bottleneck + cfg.bottleneck + cfg.bottleneck * d_out + d_out


def _accepts(cfg: MAMAdapterConfig, site: Site) -> str | None:
    if _is_prefix_site(site):
        return prefix_refusal(site)
    assert isinstance(site, ModuleSite)
    if site.weight is not None and site.weight.layout == "conv":
        return (
            f"{site.name!r} is a convolution; MAM's parallel adapter reads channels-last "
            "tokens: target 'mlp'"
        )
    if site.features <= 0:
        return f"the width of {site.name!r}'s output is unknown; target 'mlp'"
    return None


def _fits(cfg: MAMAdapterConfig, site: Site) -> str | None:
    return prefix_size_refusal("prefix_tokens", cfg.prefix_tokens, site)


METHOD = Method(
    id="mam_adapter",
    family="hybrid",
    config=MAMAdapterConfig,
    build=_build,
    num_parameters=_count,
    formula="attention: l · 2·D per layer (text models: l · L·2·D_kv at the tokens site); "
    "FFN: d_in · r + r + r · d + d per mlp sublayer (l: prefix_tokens, r: bottleneck)",
    site_kinds=("module", "sequence"),
    default_targets=("tokens?", "attn?", "mlp"),
    budget_field="prefix_tokens",
    mergeable=False,
    identity_at_init=False,
    paper="He et al., Towards a Unified View of Parameter-Efficient Transfer Learning, ICLR "
    "2022, arXiv:2110.04366",
    summary="prefix tuning on attention + a scaled parallel adapter on the FFN",
    accepts=_accepts,
    size_check=_fits,
    refuses="attn sites of Hugging Face text models (target tokens), the tokens site of vision "
    "towers (target attn), convolution sites and sites of unknown width for the adapter",
)
