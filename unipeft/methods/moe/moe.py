"""``moe``: a mixture of experts over any registered delta method.

Each targeted site gets ``E = num_experts`` deltas of the method ``expert`` (any registered
method id, a third-party plugin's too, built through the registry with ``expert_config``)
and a router (:class:`unipeft.blocks.Router`) on the site's input ``x``. With ``y`` the
site's output and ``E_i(x, y)`` what expert ``i`` alone would make of it,

    y' = y + Σ_i g_i(x) · (E_i(x, y) − y)

so an expert that adds a change (LoRA, a bottleneck adapter) contributes its change scaled
by its gate, and an expert that transforms the output ((IA)³'s ``l ⊙ y``) contributes the
difference it makes. With the soft router, ``Σ g_i = 1`` and ``E`` (IA)³ experts give
``y ⊙ Σ_i g_i l_i``: the gates mix the scales. The gates come from
``softmax(W_r h)`` (``W_r`` ``(E, d_in)``, no bias), ``h`` being ``x`` at every position
(``routing="token"``) or its mean over a sample's positions (``routing="sample"``), and are
``soft`` (all experts), ``top_k`` (the k most probable, renormalised) or ``top_p`` (the
smallest set whose probability reaches ``top_p``, renormalised: Huang et al., 2024). Every
expert runs on every row (the gates zero the unselected ones), so that all of them stay in
the autograd graph. ``model.aux_loss()`` returns
``balance_coef · L_bal + z_coef · L_z`` of the last forward per site (the Switch
load-balancing loss and the ST-MoE router z-loss, see :mod:`unipeft.blocks.routing` and
docs/moe.md), plus the experts' own auxiliary losses.

Papers: Shazeer et al., *Outrageously Large Neural Networks: The Sparsely-Gated
Mixture-of-Experts Layer*, 2017, arXiv:1701.06538; Fedus et al., *Switch Transformers*, 2021,
arXiv:2101.03961; Zoph et al., *ST-MoE*, 2022, arXiv:2202.08906; Huang et al., *Harder Tasks
Need More Experts: Dynamic Routing in MoE Models*, 2024, arXiv:2403.07652.

Shared across sites: nothing (each site has its own router and experts). Experts whose
method has a shared module (``Method.shared``: VeRA, VB-LoRA...) are refused at config
time, since one shared module per expert would need one adapter per expert.

PEFT equivalent: none (PEFT has no generic mixture); X-LoRA (``xlora``) is the closest.

Sites: whatever the expert accepts (its refusal is passed on, prefixed), with channels last
(the router reads ``x``'s last dim): convolution sites (channels first) are refused, and so
are sequence sites (soft prompts have no per-position input to route on) and sequence-only
experts (``prompt_tuning``). Not mergeable: the gates depend on the input. The config field
``expert_config`` is kept as canonical JSON text (a dict is accepted and converted) because
the conformance kit draws only scalar fields.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from torch import Tensor

from ...blocks import Router, router_parameters
from ...contract.config import DeltaConfig
from ...contract.deltas import DeltaModule, MixtureOfExpertsDelta
from ...contract.errors import PluginError
from ...contract.method import Method
from ...contract.sites import ModuleSite, SequenceSite, Site

SUGGESTED_EXPERTS = ("lora", "ia3", "bottleneck_adapter")
"""Experts the conformance kit draws; any registered method id is accepted."""


def lookup(method_id: str) -> Method:
    """The registered method ``method_id`` (built-in or from a plugin)."""
    from ...runtime.registry import registry

    return registry().method(method_id)


def expert_refusal(method: Method) -> str | None:
    """Why ``method`` cannot be an expert of a mixture, or None."""
    if method.id in ("moe", "xlora"):
        return f"{method.id!r} is itself a mixture; nest experts of another method instead"
    if method.shared is not None:
        return (
            f"method {method.id!r} shares one module across its sites (Method.shared), so its "
            "experts could not each have their own; choose a method without shared tensors "
            "(lora, ia3, bottleneck_adapter...)"
        )
    if "projection" not in method.site_kinds and "module" not in method.site_kinds:
        return (
            f"method {method.id!r} attaches only to {'/'.join(method.site_kinds)} sites (soft "
            "tokens), which have no per-position input for a router; choose a method that "
            "transforms a module's output (lora, ia3, bottleneck_adapter...)"
        )
    return None


class MoeConfig(DeltaConfig):
    """The expert method and its config, the number of experts, and the router."""

    expert: Literal["lora", "ia3", "bottleneck_adapter"] | str = Field(
        "lora",
        description="id of the registered method each expert is (a plugin's too, e.g. lora_fa)",
    )
    expert_config: str | None = Field(
        None,
        description="the expert method's config, as a dict or its JSON text (validated by that "
        "method's own config class); None: its defaults",
    )
    num_experts: int = Field(4, ge=2, le=64, description="experts per site")
    router: Literal["soft", "top_k", "top_p"] = Field(
        "soft",
        description="soft: every expert, softmax gates; top_k: the k most probable, "
        "renormalised; top_p: the smallest set whose probability reaches top_p, renormalised",
    )
    top_k: int = Field(2, ge=1, le=64, description="experts per row with router='top_k'")
    top_p: float = Field(
        0.5, gt=0.0, le=1.0, description="probability mass to reach with router='top_p'"
    )
    routing: Literal["token", "sample"] = Field(
        "token",
        description="token: gates per position; sample: one set of gates per sample, routed "
        "on the mean of its positions",
    )
    balance_coef: float = Field(
        0.01, ge=0.0, le=100.0, description="weight of the load-balancing loss in aux_loss()"
    )
    z_coef: float = Field(
        0.001, ge=0.0, le=100.0, description="weight of the router z-loss in aux_loss()"
    )

    @field_validator("expert")
    @classmethod
    def _registered(cls, value: str) -> str:
        try:
            method = lookup(value)
        except PluginError as exc:  # an unknown id: the message lists the registered ones
            raise ValueError(str(exc)) from None
        reason = expert_refusal(method)
        if reason is not None:
            raise ValueError(reason)
        return value

    @field_validator("expert_config", mode="before")
    @classmethod
    def _to_text(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return json.dumps(value, sort_keys=True)
        return value

    @field_validator("expert_config")
    @classmethod
    def _valid_for_expert(cls, value: str | None, info: Any) -> str | None:
        if value is None:
            return None
        try:
            values = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a dict nor a JSON object ({exc})") from None
        if not isinstance(values, dict):
            raise ValueError("must be a dict (or a JSON object) of the expert's fields")
        expert = info.data.get("expert")
        if expert is None:  # the expert itself was refused; that error is reported
            return value
        method = lookup(expert)
        try:
            cfg = method.config.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<config>'}: {e['msg']}"
                for e in exc.errors()
            )
            raise ValueError(f"invalid config for expert {expert!r}: {problems}") from None
        return json.dumps(cfg.model_dump(mode="json"), sort_keys=True)

    @model_validator(mode="after")
    def _k_within_experts(self) -> MoeConfig:
        if self.router == "top_k" and self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        return self

    def expert_method(self) -> Method:
        return lookup(self.expert)

    def expert_settings(self) -> DeltaConfig:
        """The expert's validated config."""
        values = json.loads(self.expert_config) if self.expert_config else {}
        return self.expert_method().config.parse(self.expert, values)


class MoeDelta(MixtureOfExpertsDelta):
    """``y + Σ_i g_i(x) (E_i(x, y) − y)`` with a :class:`~unipeft.blocks.Router`.

    ``aux_loss()``: ``balance_coef · L_bal + z_coef · L_z`` of the last forward, plus the
    experts' own auxiliary losses.
    """

    def __init__(
        self,
        in_features: int,
        experts: list[DeltaModule],
        router: Router,
        balance_coef: float = 0.0,
        z_coef: float = 0.0,
    ) -> None:
        super().__init__(in_features, experts)
        self.router = router  # replaces the base class's plain linear router
        self.balance_coef = balance_coef
        self.z_coef = z_coef

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        if x is None:
            raise RuntimeError("a mixture routes on the site's input, which was not captured")
        gates = self.router(x, y.ndim).to(y.dtype)
        out = y
        for i, expert in enumerate(self.experts):
            out = out + gates[..., i : i + 1] * (expert(x, y) - y)
        return out

    def aux_loss(self) -> Tensor | None:
        total = self.router.aux_loss(self.balance_coef, self.z_coef)
        for expert in self.experts:
            loss = expert.aux_loss()
            if loss is not None:
                total = loss if total is None else total + loss
        return total

    def lr_scale(self) -> dict[str, float]:
        return {
            f"experts.{i}.{name}": scale
            for i, expert in enumerate(self.experts)
            for name, scale in expert.lr_scale().items()
        }


def router_width(site: Site) -> int:
    """The width of the input a router reads at ``site``: a projection's ``in_features``,
    else the site's features (a sublayer's input has its output's width)."""
    assert isinstance(site, ModuleSite)
    return site.in_features or site.features


def make_router(cfg: MoeConfig, site: Site, num_experts: int) -> Router:
    return Router(
        router_width(site), num_experts, cfg.router,
        top_k=cfg.top_k, top_p=cfg.top_p, routing=cfg.routing,
    )  # fmt: skip


def _build(cfg: MoeConfig, site: Site) -> MoeDelta:
    method, ecfg = cfg.expert_method(), cfg.expert_settings()
    experts = [method.build(ecfg, site) for _ in range(cfg.num_experts)]
    router = make_router(cfg, site, cfg.num_experts)
    return MoeDelta(router_width(site), experts, router, cfg.balance_coef, cfg.z_coef)


def _count(cfg: MoeConfig, site: Site) -> int:
    method, ecfg = cfg.expert_method(), cfg.expert_settings()
    each = int(method.num_parameters(ecfg, site))
    return router_parameters(router_width(site), cfg.num_experts) + cfg.num_experts * each


def channels_last_refusal(method_id: str, site: Site) -> str | None:
    """Why a router cannot read ``site``'s input (sequence sites, channels-first sites)."""
    if isinstance(site, SequenceSite):
        return (
            f"{site.name!r} is a sequence site; {method_id} routes a module's input per "
            "position. Target projections or sublayers (attn.q, attn.v, mlp, block)"
        )
    if site.channel_dim not in (-1,) or (site.weight is not None and site.weight.layout == "conv"):
        return (
            f"{site.name!r} is a convolution (channels first); {method_id}'s router reads the "
            "input's last dim. Target the transformer's projections instead (attn.q, mlp.up)"
        )
    return None


def _accepts(cfg: MoeConfig, site: Site) -> str | None:
    reason = channels_last_refusal("moe", site)
    if reason is not None:
        return reason
    expert = cfg.expert_method()
    inner = expert.refusal(cfg.expert_settings(), site)
    if inner is not None:
        return f"its expert {expert.id!r} refuses it ({inner})"
    return None


def _size_check(cfg: MoeConfig, site: Site) -> str | None:
    inner = cfg.expert_method().size_refusal(cfg.expert_settings(), site)
    return None if inner is None else f"expert_config: {inner}"


def _targets(cfg: MoeConfig) -> list[str]:
    return cfg.expert_method().targets_for(cfg.expert_settings())


def _identity(cfg: MoeConfig) -> bool:
    return cfg.expert_method().is_identity_at_init(cfg.expert_settings())


METHOD = Method(
    id="moe",
    family="moe",
    config=MoeConfig,
    build=_build,
    num_parameters=_count,
    formula="d_in · E + E · n_expert per site (a d_in x E router and E experts of n_expert "
    "parameters each, the expert method's own count at that site)",
    site_kinds=("projection", "module"),
    default_targets=_targets,
    budget_field="num_experts",
    mergeable=False,
    identity_at_init=_identity,
    paper="Shazeer et al., Outrageously Large Neural Networks: The Sparsely-Gated "
    "Mixture-of-Experts Layer, 2017, arXiv:1701.06538; Fedus et al., Switch Transformers, "
    "2021, arXiv:2101.03961; Zoph et al., ST-MoE, 2022, arXiv:2202.08906; Huang et al., "
    "Harder Tasks Need More Experts: Dynamic Routing in MoE Models, 2024, arXiv:2403.07652",
    summary="a router (soft, top-k or top-p; per token or per sample) over experts of any "
    "registered method, with load-balancing and z-losses",
    accepts=_accepts,
    size_check=_size_check,
    refuses="sequence sites and sequence-only experts, convolutions (channels first), what "
    "the expert method refuses, and experts with a shared module",
)
