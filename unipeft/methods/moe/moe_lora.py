"""A mixture of LoRA experts with a router (in the spirit of MoLoRA, Zadouri et al., 2023).

Each projection gets ``num_experts`` LoRA experts and a linear router on its input; the
router is soft (every expert, softmax weights) or top-k. The load-balancing loss of the
last forward is read with ``model.aux_loss()`` and added to the task loss by the trainer.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from ...blocks import LowRankDelta, low_rank_refusal
from ...contract.config import DeltaConfig
from ...contract.deltas import MixtureOfExpertsDelta, ProjectionShape
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site


class MoELoraConfig(DeltaConfig):
    num_experts: int = Field(4, ge=2, le=256, description="LoRA experts per projection")
    top_k: int | None = Field(
        None, ge=1, le=256, description="experts used per token (None: soft routing over all)"
    )
    r: int = Field(4, ge=1, le=4096, description="rank of each expert")
    alpha: float = Field(8.0, gt=0, description="expert scale numerator (alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on each expert's input")

    @model_validator(mode="after")
    def _k_within_experts(self) -> MoELoraConfig:
        if self.top_k is not None and self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        return self


def _build(cfg: MoELoraConfig, site: Site) -> MixtureOfExpertsDelta:
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    experts = [LowRankDelta(shape, cfg.r, cfg.alpha, cfg.dropout) for _ in range(cfg.num_experts)]
    return MixtureOfExpertsDelta(shape.in_features, experts, cfg.top_k)


def _count(cfg: MoELoraConfig, site: Site) -> int:
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    return cfg.num_experts * (cfg.r * (shape.in_features + shape.out_features) + shape.in_features)


def _accepts(cfg: MoELoraConfig, site: Site) -> str | None:
    assert isinstance(site, ModuleSite)
    if site.weight is not None and site.weight.layout == "conv":
        return f"{site.name!r} is a convolution; the router reads channels-last inputs"
    return None


def _rank_fits(cfg: MoELoraConfig, site: Site) -> str | None:
    return low_rank_refusal("r", cfg.r, site)


METHOD = Method(
    id="moe_lora",
    family="moe",
    config=MoELoraConfig,
    build=_build,
    num_parameters=_count,
    formula="E · (r · (d_in + d_out) + d_in) per projection (E experts and their router)",
    site_kinds=("projection",),
    default_targets=("attn.q", "attn.v"),
    budget_field="r",
    mergeable=False,
    identity_at_init=True,
    paper="Zadouri et al., Pushing Mixture of Experts to the Limit: Extremely Parameter "
    "Efficient MoE for Instruction Tuning, 2023, arXiv:2309.05444; Fedus et al., Switch "
    "Transformers (load-balancing loss), 2021, arXiv:2101.03961",
    summary="router over LoRA experts (soft or top-k) with a load-balancing loss",
    accepts=_accepts,
    size_check=_rank_fits,
)
