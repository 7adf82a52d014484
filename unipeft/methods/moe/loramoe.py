"""LoRAMoE: soft-routed LoRA experts on the FFN, with the localized balancing constraint.

At each targeted projection, ``E = num_experts`` LoRA experts ``ΔW_i = s · B_i A_i``
(``s = alpha / r``) and a router ``W_g`` ``(E, d_in)`` on the projection's input ``x``:

    g = softmax(W_g x),   y' = y + Σ_i g_i · s · B_i A_i x

(every expert at every token: a soft router). The experts are split in two groups: the
first ``round(E · knowledge_fraction)`` keep world knowledge (type 0), the others serve the
downstream task (type 1). Each sample ``m`` of a batch has a type too (0 or 1;
:func:`set_sample_types`, 1 when unset). The localized balancing constraint (the auxiliary
loss, ``model.aux_loss()``) is

    Q[i, m] = Σ_{tokens t of sample m} g_i(x_t)                  (importance)
    I[i, m] = 1 + δ if type(i) == type(m) else 1 − δ
    Z = I ⊙ Q,   L_lbc = Var(Z) / Mean(Z)   (over all entries; population variance)

times ``balance_coef``: it balances the experts within each group while letting the group
matching a sample's type take a larger share. Per-sample sums need a batch-first input
``(N, ..., d_in)``; a 2-D input counts each row as a sample.

Paper: Dou et al., *LoRAMoE: Alleviate World Knowledge Forgetting in Large Language Models
via MoE-Style Plugin*, 2024, arXiv:2312.09979 (ACL 2024).

Shared across sites: nothing. PEFT equivalent: none.

Sites: projections with channels last (Linear, GPT-2 ``Conv1D``, fused q/k/v slices,
``nn.MultiheadAttention`` in-projection slices); the default targets are the FFN's
projections, as the paper. Refused: convolutions (the router reads the input's last dim).
Not mergeable: the gates depend on the input.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from ...blocks import LowRankConfig, LowRankDelta, Router, low_rank_parameters, low_rank_refusal
from ...contract.deltas import DeltaModule, ProjectionShape
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site
from .moe import MoeDelta, channels_last_refusal, router_width


class LoraMoeConfig(LowRankConfig):
    """LoRA's fields (each expert's rank and scale), the experts and the constraint."""

    r: int = Field(4, ge=1, le=4096, description="rank of each LoRA expert")
    alpha: float = Field(
        8.0, gt=0, description="scale numerator: each expert is scaled by alpha / r"
    )
    num_experts: int = Field(6, ge=2, le=64, description="LoRA experts per projection")
    knowledge_fraction: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="share of the experts in the world-knowledge group (type 0); the rest "
        "serve the downstream task (type 1)",
    )
    delta: float = Field(
        0.1, ge=0.0, lt=1.0, description="δ: the importance weight is 1 ± δ (same or other type)"
    )
    balance_coef: float = Field(
        0.1, ge=0.0, le=100.0, description="weight of the localized balancing loss in aux_loss()"
    )


def expert_types(cfg: LoraMoeConfig) -> list[int]:
    """0 (world knowledge) for the first ``round(E · knowledge_fraction)`` experts, else 1."""
    k = round(cfg.num_experts * cfg.knowledge_fraction)
    return [0] * k + [1] * (cfg.num_experts - k)


def localized_balance_loss(
    gates: Tensor, expert_type: Tensor, sample_type: Tensor, delta: float
) -> Tensor:
    """``Var(Z) / Mean(Z)`` with ``Z = I ⊙ Q`` (see the module docstring). ``gates``
    ``(N, ..., E)``, ``expert_type`` ``(E,)`` and ``sample_type`` ``(N,)`` of 0/1."""
    n, e = gates.shape[0], gates.shape[-1]
    q = gates.reshape(n, -1, e).sum(1).t()  # (E, N)
    same = expert_type.view(-1, 1).to(q.device) == sample_type.view(1, -1).to(q.device)
    z = q * (1 + delta * (2 * same.to(q.dtype) - 1))
    return z.var(unbiased=False) / z.mean().clamp_min(1e-9)


class LoraMoeDelta(MoeDelta):
    """Soft-routed LoRA experts; :meth:`aux_loss` is the localized balancing constraint."""

    def __init__(
        self,
        in_features: int,
        experts: list[DeltaModule],
        router: Router,
        types: list[int],
        delta: float,
        balance_coef: float,
    ) -> None:
        super().__init__(in_features, experts, router, 0.0, 0.0)
        self.types = list(types)
        self.delta = delta
        self.lbc_coef = balance_coef
        self.sample_types: Tensor | None = None
        self._gates: Tensor | None = None

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        out = super().forward(x, y)
        assert self.router.last is not None
        self._gates = self.router.last[1]
        return out

    def aux_loss(self) -> Tensor | None:
        if self._gates is None or self.lbc_coef == 0:
            return None
        gates = self._gates if self._gates.ndim > 1 else self._gates.unsqueeze(0)
        n = gates.shape[0]
        types = self.sample_types
        if types is None:
            types = gates.new_ones(n, dtype=gates.dtype)
        elif types.numel() != n:
            raise ValueError(
                f"set_sample_types gave {types.numel()} sample types for a batch of {n}; "
                "give one type (0: world knowledge, 1: downstream) per sample of the batch"
            )
        experts = gates.new_tensor(self.types)
        return self.lbc_coef * localized_balance_loss(gates, experts, types, self.delta)


def set_sample_types(model: nn.Module, types: Tensor | None) -> None:
    """Give every LoRAMoE delta of ``model`` the type of each sample of the next batches
    (0: a world-knowledge sample, 1: a downstream-task sample; ``None``: all 1)."""
    for module in model.modules():
        if isinstance(module, LoraMoeDelta):
            module.sample_types = None if types is None else types.detach().flatten()


def _build(cfg: LoraMoeConfig, site: Site) -> LoraMoeDelta:
    shape = ProjectionShape.of(site)  # type: ignore[arg-type]
    experts: list[DeltaModule] = [
        LowRankDelta.from_config(cfg, shape) for _ in range(cfg.num_experts)
    ]
    router = Router(router_width(site), cfg.num_experts, "soft")
    return LoraMoeDelta(
        router_width(site), experts, router, expert_types(cfg), cfg.delta, cfg.balance_coef
    )


def _count(cfg: LoraMoeConfig, site: Site) -> int:
    return router_width(site) * cfg.num_experts + cfg.num_experts * low_rank_parameters(cfg.r, site)


def _accepts(cfg: LoraMoeConfig, site: Site) -> str | None:
    assert isinstance(site, ModuleSite)
    return channels_last_refusal("loramoe", site)


def _rank_fits(cfg: LoraMoeConfig, site: Site) -> str | None:
    return low_rank_refusal("r", cfg.r, site)


METHOD = Method(
    id="loramoe",
    family="moe",
    config=LoraMoeConfig,
    build=_build,
    num_parameters=_count,
    formula="d_in · E + E · r · (d_in + d_out) per projection (a router and E LoRA experts)",
    site_kinds=("projection",),
    default_targets=("mlp.up", "mlp.gate?", "mlp.down"),
    budget_field="r",
    mergeable=False,
    identity_at_init=True,
    paper="Dou et al., LoRAMoE: Alleviate World Knowledge Forgetting in Large Language Models "
    "via MoE-Style Plugin, 2024, arXiv:2312.09979",
    summary="soft-routed LoRA experts on the FFN in two groups, with the localized balancing "
    "constraint as auxiliary loss",
    accepts=_accepts,
    size_check=_rank_fits,
    refuses="convolutions (the router reads channels-last inputs)",
)
