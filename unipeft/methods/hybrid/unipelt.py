"""UniPELT: LoRA, a serial adapter and prefix tuning, each behind a learned gate
(Mao et al., 2022).

Where a target lands decides the part:

- projection sites (``attn.q``, ``attn.v``): gated LoRA, ``y + G_L(x) · (s B A x)`` with
  ``G_L = sigmoid(w·x + b)`` per position, from the projection's input;
- sublayer sites (``mlp``): a gated serial bottleneck adapter, ``y + G_A(y) · up(ReLU(down
  y))`` with the gate read from the sublayer's output;
- attention: a gated prefix (:mod:`unipeft.methods.additive.prefix_tuning`): ``P`` learned
  keys and values per layer, scaled by ``sigmoid(g_k)`` and ``sigmoid(g_v)``, two learned
  gates per layer. On Hugging Face text models the prefixes enter at the ``tokens`` site as
  a key/value cache (target ``tokens``); on vision towers at each ``attn`` site. The paper
  computes the prefix gate from the layer's input; a prefix that enters text models as a
  cache exists before the layer runs, so here the gate is a learned constant per layer
  and per keys/values, on every backbone alike.

``prefix_tokens=0`` leaves the prefix out (and then ``attn`` sites get a gated adapter, as
any other sublayer). ``prompt_tokens`` is the field's former name (UniPELT's third part was
soft prompt tokens before it followed the paper); it is still accepted and, when set, is
the prefix length. Shares nothing across sites. No PEFT equivalent. Refused: convolutions
(the gates read channels-last inputs), sites of unknown width, ``attn`` sites of Hugging
Face text models (target ``tokens``) and vision towers' ``tokens`` site (target ``attn``).
Not mergeable; the identity at init only without a prefix.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from ...blocks import LowRankDelta, low_rank_refusal
from ...contract.config import DeltaConfig
from ...contract.deltas import DeltaModule, Gate, HybridDelta, ProjectionShape
from ...contract.method import Method
from ...contract.sites import ModuleSite, SequenceSite, Site
from ..additive.bottleneck_adapter import BottleneckAdapterDelta
from ..additive.prefix_tuning import (
    PrefixDelta,
    key_width,
    prefix_parameters,
    prefix_refusal,
    prefix_size_refusal,
    text_geometry,
)


class UniPELTConfig(DeltaConfig):
    lora_r: int = Field(8, ge=1, le=4096, description="rank of the LoRA part")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scale numerator (alpha / r)")
    bottleneck: int = Field(16, ge=1, le=65536, description="width of the adapter part")
    prefix_tokens: int = Field(
        10, ge=0, le=1024, description="prefix length of the prefix part (0 leaves it out)"
    )
    prompt_tokens: int | None = Field(
        None,
        ge=0,
        le=1024,
        description="former name of prefix_tokens, still accepted: when set, it is the "
        "prefix length and prefix_tokens is not read",
    )
    init_std: float = Field(0.02, gt=0, le=10, description="std of the adapter's init")
    prefix_init_std: float = Field(1.0, gt=0, le=10, description="std of the prefixes' init")

    @property
    def prefix_length(self) -> int:
        return self.prompt_tokens if self.prompt_tokens is not None else self.prefix_tokens

    @property
    def prefix_field(self) -> str:
        return "prompt_tokens" if self.prompt_tokens is not None else "prefix_tokens"


class GatedPrefixDelta(PrefixDelta):
    """A prefix whose keys and values are scaled by ``sigmoid(g_k)``, ``sigmoid(g_v)``,
    one pair of learned gates per layer (``gate``: ``(layers, 2)``, zero at init)."""

    family = "hybrid"

    def __init__(self, num_tokens: int, width: int, layers: int | None) -> None:
        super().__init__(num_tokens, width, layers)
        self.gate = nn.Parameter(torch.zeros(layers or 1, 2))

    def prefix_kv(self) -> tuple[Tensor, Tensor]:
        keys, values = super().prefix_kv()
        g = torch.sigmoid(self.gate).to(keys.dtype)
        if self.layers is None:
            return keys * g[0, 0], values * g[0, 1]
        return keys * g[:, 0, None, None], values * g[:, 1, None, None]


def _targets(cfg: UniPELTConfig) -> tuple[str, ...]:
    base = ("attn.q", "attn.v", "mlp")
    return (*base, "tokens?", "attn?") if cfg.prefix_length else base


def _is_prefix_site(cfg: UniPELTConfig, site: Site) -> bool:
    if isinstance(site, SequenceSite):
        return True
    return bool(cfg.prefix_length) and site.weight is None and site.role == "attn"


def _build(cfg: UniPELTConfig, site: Site) -> DeltaModule:
    if _is_prefix_site(cfg, site):
        layers = text_geometry(site)[0] if isinstance(site, SequenceSite) else None
        delta = GatedPrefixDelta(cfg.prefix_length, key_width(site), layers)
        delta.own(cfg.prefix_init_std)
        return delta
    assert isinstance(site, ModuleSite)
    if site.weight is not None:
        lora = LowRankDelta(ProjectionShape.of(site), cfg.lora_r, cfg.lora_alpha)
        return HybridDelta({"lora": lora}, {"lora": Gate(site.weight.in_features, "input")})
    adapter = BottleneckAdapterDelta(
        site.features,
        site.features,
        cfg.bottleneck,
        placement="serial",
        activation="relu",
        scaling=1.0,
        init_std=cfg.init_std,
        channel_dim=site.channel_dim,
    )
    return HybridDelta({"adapter": adapter}, {"adapter": Gate(site.features, "output")})


def _count(cfg: UniPELTConfig, site: Site) -> int:
    if _is_prefix_site(cfg, site):
        layers = text_geometry(site)[0] if isinstance(site, SequenceSite) else 1
        return prefix_parameters(cfg.prefix_length, site) + 2 * layers
    assert isinstance(site, ModuleSite)
    if site.weight is not None:
        shape = ProjectionShape.of(site)
        return cfg.lora_r * (shape.in_features + shape.out_features) + shape.in_features + 1
    d, b = site.features, cfg.bottleneck
    return 2 * d * b + b + d + d + 1


def _accepts(cfg: UniPELTConfig, site: Site) -> str | None:
    if isinstance(site, SequenceSite):
        if not cfg.prefix_length:
            return "prefix_tokens is 0, so token sites are unused"
        return prefix_refusal(site)
    if _is_prefix_site(cfg, site):
        return prefix_refusal(site)
    if site.weight is not None and site.weight.layout == "conv":
        return f"{site.name!r} is a convolution; UniPELT's gates read channels-last inputs"
    if site.features <= 0:
        return f"the width of {site.name!r}'s output is unknown"
    return None


def _fits(cfg: UniPELTConfig, site: Site) -> str | None:
    if isinstance(site, SequenceSite):
        return prefix_size_refusal(cfg.prefix_field, cfg.prefix_length, site)
    return low_rank_refusal("lora_r", cfg.lora_r, site)


def _identity(cfg: Any) -> bool:
    return cfg.prefix_length == 0


METHOD = Method(
    id="unipelt",
    family="hybrid",
    config=UniPELTConfig,
    build=_build,
    num_parameters=_count,
    formula="projection: r·(d_in+d_out) + d_in + 1; sublayer: 2·d·b + b + 2·d + 1; "
    "attention (vision): P·2·D + 2; tokens (text models): P·L·2·D_kv + 2·L",
    site_kinds=("projection", "module", "sequence"),
    default_targets=_targets,
    budget_field="lora_r",
    mergeable=False,
    identity_at_init=_identity,
    paper="Mao et al., UniPELT: A Unified Framework for Parameter-Efficient Language Model "
    "Tuning, 2022, arXiv:2110.07577",
    summary="gated LoRA + adapter + prefix",
    accepts=_accepts,
    size_check=_fits,
    refuses="convolutions, sites of unknown width, attn sites of Hugging Face text models "
    "(target tokens) and vision towers' tokens site (target attn)",
)
