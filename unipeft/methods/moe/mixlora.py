"""MixLoRA: top-k routed LoRA experts on the feed-forward network, plain LoRA on attention.

At a feed-forward projection (roles ``mlp.*``; a site reached by a module-name regex has no
role and counts as attention: ``mlp.up``, ``mlp.gate``, ``mlp.down``),
with ``E = num_experts`` LoRA experts ``ΔW_i = s · B_i A_i`` (``s = alpha / r``) and a
router ``W_r`` ``(E, d_in)`` on the projection's input ``x``:

    p = softmax(W_r x),  g = top_k(p) renormalised,  y' = y + Σ_i g_i · s · B_i A_i x

and at an attention projection (any other role) a single LoRA ``y' = y + s · B A x``, as the
paper adapts attention with plain LoRA beside the mixture of FFN experts. The auxiliary
loss (``model.aux_loss()``) is the Switch load-balancing loss ``balance_coef · E · Σ_i f_i
P_i`` of every routed site (:mod:`unipeft.blocks.routing`); the paper's coefficient is 0.01.

Difference from the paper: MixLoRA routes once per FFN block and each expert is the whole
FFN with its own LoRA on every projection, ``Σ_i g_i FFN_i(x)``; unipeft attaches to
projections, so each FFN projection has its own router and the experts' changes are mixed
per projection (the nonlinearity between ``mlp.up`` and ``mlp.down`` sees the mixed hidden
state). With a single FFN projection targeted the two agree exactly.

Paper: Li et al., *MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based
Mixture of Experts*, 2024, arXiv:2404.15159.

Shared across sites: nothing. PEFT equivalent: none (PEFT has no MixLoRA).

Sites: projections with channels last (Linear, GPT-2 ``Conv1D``, fused q/k/v slices,
``nn.MultiheadAttention`` in-projection slices). Refused: convolutions (the router reads the
input's last dim; target the transformer's projections). Not mergeable: the gates depend on
the input (the attention LoRAs alone could be merged; use ``lora`` for that).
"""

from __future__ import annotations

from pydantic import Field, model_validator
from torch import nn

from ...blocks import LowRankConfig, LowRankDelta, Router, low_rank_parameters, low_rank_refusal
from ...contract.deltas import ProjectionShape
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site
from .moe import MoeDelta, channels_last_refusal, router_width


class MixLoraConfig(LowRankConfig):
    """LoRA's fields (each expert's rank and scale), the experts and the router."""

    r: int = Field(8, ge=1, le=4096, description="rank of each expert and attention LoRA")
    num_experts: int = Field(8, ge=2, le=64, description="LoRA experts per FFN projection")
    top_k: int = Field(2, ge=1, le=64, description="experts per token (the paper's k = 2)")
    balance_coef: float = Field(
        0.01, ge=0.0, le=100.0, description="weight of the load-balancing loss in aux_loss()"
    )

    @model_validator(mode="after")
    def _k_within_experts(self) -> MixLoraConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        return self


def routed(cfg: MixLoraConfig, site: Site) -> bool:
    """Whether ``site`` gets the mixture (an FFN projection) rather than one LoRA."""
    role = getattr(site, "role", None) or ""
    return role == "mlp" or role.startswith("mlp.")


def _build(cfg: MixLoraConfig, site: Site) -> nn.Module:
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    if not routed(cfg, site):
        return LowRankDelta.from_config(cfg, shape)
    experts = [LowRankDelta.from_config(cfg, shape) for _ in range(cfg.num_experts)]
    router = Router(router_width(site), cfg.num_experts, "top_k", top_k=cfg.top_k)
    return MoeDelta(router_width(site), experts, router, cfg.balance_coef, 0.0)


def _count(cfg: MixLoraConfig, site: Site) -> int:
    lora = low_rank_parameters(cfg.r, site)
    if not routed(cfg, site):
        return lora
    return router_width(site) * cfg.num_experts + cfg.num_experts * lora


def _accepts(cfg: MixLoraConfig, site: Site) -> str | None:
    assert isinstance(site, ModuleSite)
    return channels_last_refusal("mixlora", site)


def _rank_fits(cfg: MixLoraConfig, site: Site) -> str | None:
    return low_rank_refusal("r", cfg.r, site)


METHOD = Method(
    id="mixlora",
    family="moe",
    config=MixLoraConfig,
    build=_build,
    num_parameters=_count,
    formula="FFN projections: d_in · E + E · r · (d_in + d_out) (router and E LoRA experts); "
    "other projections: r · (d_in + d_out) (one LoRA)",
    site_kinds=("projection",),
    default_targets=("attn.q", "attn.k", "attn.v", "attn.out", "mlp.up", "mlp.gate?", "mlp.down"),
    budget_field="r",
    mergeable=False,
    identity_at_init=True,
    paper="Li et al., MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based "
    "Mixture of Experts, 2024, arXiv:2404.15159",
    summary="top-k routed LoRA experts on the FFN projections, plain LoRA on attention, "
    "load-balancing loss",
    accepts=_accepts,
    size_check=_rank_fits,
    refuses="convolutions (the router reads channels-last inputs)",
)
