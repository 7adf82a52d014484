"""UniPELT: LoRA, a serial adapter and soft prompts, each behind a learned gate
(Mao et al., 2022). Prompt tuning stands in for the paper's prefix tuning.

Where a target lands decides the part: projection sites get gated LoRA (gate from the
projection's input), other module sites a gated serial bottleneck adapter (gate from the
sublayer's output), token sequences gated soft tokens (one learned scalar gate).
"""

from __future__ import annotations

from pydantic import Field

from ...blocks import LowRankDelta, low_rank_refusal
from ...contract.config import DeltaConfig
from ...contract.deltas import Gate, HybridDelta, ProjectionShape, ScalarGate
from ...contract.method import Method
from ...contract.sites import ModuleSite, SequenceSite, Site
from ..additive.bottleneck_adapter import BottleneckAdapterDelta
from ..additive.prompt_tuning import PromptTuningConfig, build_prompt, tokens_refusal


class UniPELTConfig(DeltaConfig):
    lora_r: int = Field(8, ge=1, le=4096, description="rank of the LoRA part")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scale numerator (alpha / r)")
    bottleneck: int = Field(16, ge=1, le=65536, description="width of the adapter part")
    prompt_tokens: int = Field(
        10, ge=0, le=1024, description="soft tokens of the prompt part (0 leaves it out)"
    )
    init_std: float = Field(0.02, gt=0, le=10, description="std of the prompt and adapter init")


def _targets(cfg: UniPELTConfig) -> tuple[str, ...]:
    base = ("attn.q", "attn.v", "mlp")
    return (*base, "tokens") if cfg.prompt_tokens else base


def _build(cfg: UniPELTConfig, site: Site) -> HybridDelta:
    if isinstance(site, SequenceSite):
        prompt = build_prompt(
            PromptTuningConfig(num_tokens=cfg.prompt_tokens, init_std=cfg.init_std), site
        )
        return HybridDelta({"prompt": prompt}, {"prompt": ScalarGate()})
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
    if isinstance(site, SequenceSite):
        return cfg.prompt_tokens * site.features + 1
    if site.weight is not None:
        shape = ProjectionShape.of(site)
        return cfg.lora_r * (shape.in_features + shape.out_features) + shape.in_features + 1
    d, b = site.features, cfg.bottleneck
    return 2 * d * b + b + d + d + 1


def _accepts(cfg: UniPELTConfig, site: Site) -> str | None:
    if isinstance(site, SequenceSite):
        return None if cfg.prompt_tokens else "prompt_tokens is 0, so token sites are unused"
    if site.weight is not None and site.weight.layout == "conv":
        return f"{site.name!r} is a convolution; UniPELT's gates read channels-last inputs"
    if site.features <= 0:
        return f"the width of {site.name!r}'s output is unknown"
    return None


def _fits(cfg: UniPELTConfig, site: Site) -> str | None:
    if isinstance(site, SequenceSite):
        return tokens_refusal("prompt_tokens", cfg.prompt_tokens, site)
    return low_rank_refusal("lora_r", cfg.lora_r, site)


METHOD = Method(
    id="unipelt",
    family="hybrid",
    config=UniPELTConfig,
    build=_build,
    num_parameters=_count,
    formula="projection: r·(d_in+d_out) + d_in + 1; sublayer: 2·d·b + b + 2·d + 1; tokens: P·D + 1",
    site_kinds=("projection", "module", "sequence"),
    default_targets=_targets,
    budget_field="lora_r",
    mergeable=False,
    identity_at_init=lambda cfg: cfg.prompt_tokens == 0,
    paper="Mao et al., UniPELT: A Unified Framework for Parameter-Efficient Language Model "
    "Tuning, 2022, arXiv:2110.07577",
    summary="gated LoRA + adapter + soft prompt",
    accepts=_accepts,
    size_check=_fits,
)
