"""RepAdapter: a linear adapter before a block's projections, folded into their weights
(Luo et al., 2023).

RepAdapter puts a purely linear bottleneck on the input of the attention's q/k/v
projections and of the MLP's first projection:

    x' = x + s · (U dropout(D x + b_D) + b_U)
    y  = W x' + b = W x + b + s · W (U dropout(D x + b_D) + b_U)

``D`` ``(h, d)`` with bias ``b_D`` (``h``: ``hidden``), ``U`` a grouped ``(d, h)`` map with
bias ``b_U``: ``groups`` blocks on its diagonal, each ``(d/g, h/g)`` (the paper's group-wise
1x1 convolution), ``s`` the scale. When ``g`` does not divide ``h`` the hidden width is
split as evenly as it goes (so any ``hidden`` is valid, which the budget planner needs);
with ``h < g`` some groups' output rows get only their bias. Without an activation the
adapter is linear, so at inference it is re-parameterised into the projection that follows
it (``dropout`` is off):

    W' = W (I + s U D),    b' = b + s · W (U b_D + b_U)

which is what ``merge()`` writes. ``D`` starts Xavier-uniform, ``U`` and both biases at zero:
the adapter starts as the identity. The delta reads ``W`` through ``site.weight_views()``
(a plain attribute, like DoRA), so it follows the weight as it is stored; merged into a
weight that another adapter changed, it folds ``W`` as changed (see docs/lifecycle.md on
weight-reading deltas). Two RepAdapters active unmerged on one projection add
``W (A_1 + A_2)``; merged one after the other they give ``W (I + A_1)(I + A_2)``.

**Shared across sites:** one adapter per *input*, as in the paper, held by the adapter's
shared module: the q, k and v projections of a block (``attn.q``, ``attn.k``, ``attn.v``:
separate Linears on BERT and Llama, slices of timm's fused ``qkv``, of GPT-2's ``c_attn``
and of ``nn.MultiheadAttention``'s ``in_proj``) share the one adapter before the
attention, and ``mlp.up`` / ``mlp.gate`` share the one before the MLP. Any other site
(``attn.out``, ``mlp.down``, a module targeted by name such as ``blocks.0.attn.qkv``) has
an adapter of its own. Each site applies the shared adapter itself, so in training each
draws its own dropout mask.

Paper: Luo, Huang, Zhou, Sun, Ji, *Towards Efficient Visual Adaption via Structural
Re-parameterization*, 2023, arXiv:2302.08106.

PEFT equivalent: none (PEFT has no RepAdapter type).

Sites: Linear-like projections (``nn.Linear``, GPT-2 ``Conv1D``, fused q/k/v slices,
``nn.MultiheadAttention`` in_proj slices). Refused: convolutions (the adapter maps token
features; a convolution's input is a spatial map) and, at apply time, projections whose
input width is not a multiple of ``groups``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import ProjectionShape, ReparameterizedDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site

_ATTN_IN = ("attn.q", "attn.k", "attn.v")
_MLP_IN = ("mlp.up", "mlp.gate")


class RepAdapterConfig(DeltaConfig):
    """RepAdapter's fields (the paper's values as defaults)."""

    hidden: int = Field(8, ge=1, le=65536, description="hidden width h of the adapter")
    groups: int = Field(
        2,
        ge=1,
        le=1024,
        description="groups of the up projection U (block-diagonal); must divide the input "
        "width of every site; the hidden width is split as evenly as it goes",
    )
    scale: float = Field(1.0, gt=0.0, le=100.0, description="factor s on the adapter's output")
    dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="dropout on the hidden activation (training only)"
    )


def group_mask(features: int, hidden: int, groups: int) -> Tensor:
    """``(d, h)`` bool: which entries of the up projection ``U`` exist. Output rows are split
    into ``groups`` equal blocks, hidden columns into ``groups`` blocks as even as they go
    (the first ``h mod g`` one wider, as ``torch.tensor_split``)."""
    rows = torch.arange(features) // (features // groups)
    cols = torch.cat(
        [torch.full((len(c),), i) for i, c in enumerate(torch.arange(hidden).tensor_split(groups))]
    )
    return rows[:, None] == cols[None, :]


class LinearAdapter(nn.Module):
    """``x ↦ s · (U dropout(D x + b_D) + b_U)`` ``(..., d) -> (..., d)``: the part of
    ``x' = x + ...`` that is added. ``U``'s diagonal blocks are kept side by side in
    ``up_weight`` ``(d / g, h)``: column ``j`` of it feeds the output rows of its group."""

    def __init__(self, features: int, cfg: RepAdapterConfig) -> None:
        super().__init__()
        g = cfg.groups
        self.groups, self.scale = g, cfg.scale
        self.down = nn.Linear(features, cfg.hidden)
        self.up_weight = nn.Parameter(torch.zeros(features // g, cfg.hidden))
        self.up_bias = nn.Parameter(torch.zeros(features))
        self.register_buffer("mask", group_mask(features, cfg.hidden, g), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        with torch.no_grad():
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.zeros_(self.down.bias)

    def up_dense(self) -> Tensor:
        """``U`` as a dense ``(d, h)`` block-diagonal matrix."""
        return self.up_weight.repeat(self.groups, 1) * self.mask

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.dropout(self.down(x))
        return self.scale * F.linear(hidden, self.up_dense(), self.up_bias)

    def folded(self) -> tuple[Tensor, Tensor]:
        """``(s U D, s (U b_D + b_U))``: the map ``x ↦ x' - x`` as a matrix and an offset."""
        u = self.up_dense()
        return self.scale * (u @ self.down.weight), self.scale * (u @ self.down.bias + self.up_bias)


class RepAdapterBank(nn.Module):
    """The adapter's linear adapters, one per input they sit on (see :func:`group_key`)."""

    def __init__(self, widths: dict[str, int], cfg: RepAdapterConfig) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict({k: LinearAdapter(d, cfg) for k, d in widths.items()})


def group_key(site: ModuleSite) -> str:
    """The input ``site`` reads, as a ModuleDict key: a block's attention input for q/k/v,
    its MLP input for up/gate, else the site itself."""
    if site.layer is not None and site.role in _ATTN_IN + _MLP_IN:
        part = "attn_in" if site.role in _ATTN_IN else "mlp_in"
        return f"{site.tower + '_' if site.tower else ''}layer{site.layer}_{part}"
    return site.name.replace(".", "__").replace(":", "__")


class RepAdapterDelta(ReparameterizedDelta):
    """``y + W a(x)``: the shared adapter ``a`` (through :attr:`shared`) on the site's input,
    projected by the site's live weight ``W`` (read through the site, not saved)."""

    def __init__(self, site: ModuleSite, shared: RepAdapterBank) -> None:
        super().__init__(ProjectionShape.of(site))
        self.site = site  # a plain attribute: nothing of it is saved
        self.key = group_key(site)
        self.use_shared(shared)

    @property
    def adapter(self) -> LinearAdapter:
        return self.shared.adapters[self.key]

    def delta_weight(self) -> Tensor:
        weight, _ = self.site.weight_views()
        m, _ = self.adapter.folded()
        return weight @ m.to(weight.dtype)

    def delta_bias(self) -> Tensor | None:
        weight, _ = self.site.weight_views()
        _, c = self.adapter.folded()
        return weight @ c.to(weight.dtype)

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        weight, _ = self.site.weight_views()
        added = self.adapter(x)
        return y + F.linear(added.to(weight.dtype), weight).to(y.dtype)

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        # W' = W (I + s U D), b' = b + W (s (U b_D + b_U)), with W the weight as it is now
        m, c = self.adapter.folded()
        new_weight = weight + weight @ m.to(weight.dtype)
        db = weight @ c.to(weight.dtype)
        return new_weight, (db if bias is None else bias + db.to(bias.dtype))


def _sites(sites: tuple[Site, ...]) -> list[ModuleSite]:
    return [s for s in sites if isinstance(s, ModuleSite) and s.weight is not None]


def _widths(sites: tuple[Site, ...]) -> dict[str, int]:
    widths: dict[str, int] = {}
    for site in _sites(sites):
        key, d = group_key(site), int(site.weight.in_features)  # type: ignore[union-attr]
        if widths.setdefault(key, d) != d:
            raise ValueError(
                f"sites sharing RepAdapter input {key!r} have different input widths "
                f"({widths[key]} and {d} at {site.name!r})"
            )
    return widths


def _shared(cfg: RepAdapterConfig, sites: tuple[Site, ...]) -> RepAdapterBank:
    return RepAdapterBank(_widths(sites), cfg)


def _shared_count(cfg: RepAdapterConfig, sites: tuple[Site, ...]) -> int:
    h, g = cfg.hidden, cfg.groups
    return sum(d * h + h + (d // g) * h + d for d in _widths(sites).values())


def _build(cfg: RepAdapterConfig, site: Site, shared: RepAdapterBank) -> RepAdapterDelta:
    assert isinstance(site, ModuleSite)
    return RepAdapterDelta(site, shared)


def _count(cfg: RepAdapterConfig, site: Site) -> int:
    return 0  # every parameter is in the shared adapters (see shared_parameters)


def _accepts(cfg: RepAdapterConfig, site: Site) -> str | None:
    if isinstance(site, ModuleSite) and site.weight is not None and site.weight.layout == "conv":
        return (
            f"{site.name!r} is a convolution: RepAdapter maps token features before a "
            "Linear-like projection (nn.Linear, GPT-2 Conv1D, q/k/v slices, "
            "nn.MultiheadAttention in_proj slices). Target attn.q, attn.k, attn.v, mlp.up"
        )
    return None


def _size_check(cfg: RepAdapterConfig, site: Site) -> str | None:
    if isinstance(site, ModuleSite) and site.weight is not None:
        d = site.weight.in_features
        if d % cfg.groups:
            return f"groups={cfg.groups} must divide the input width {d} of {site.name!r}"
    return None


METHOD = Method(
    id="repadapter",
    family="reparameterized",
    config=RepAdapterConfig,
    build=_build,
    num_parameters=_count,
    shared=_shared,
    shared_parameters=_shared_count,
    formula="d · h + h + (d / groups) · h + d per adapter input (d: its width), one input per "
    "block for q/k/v, one for mlp.up/mlp.gate, one per other site; nothing per site",
    site_kinds=("projection",),
    accepts=_accepts,
    size_check=_size_check,
    refuses="convolutions; projections whose input width is not a multiple of groups",
    default_targets=("attn.q", "attn.k", "attn.v", "mlp.up", "mlp.gate?"),
    budget_field="hidden",
    mergeable=True,
    identity_at_init=True,
    paper="Luo, Huang, Zhou, Sun, Ji, Towards Efficient Visual Adaption via Structural "
    "Re-parameterization, 2023, arXiv:2302.08106",
    summary="a linear group-wise bottleneck on the input of q/k/v and the MLP's first "
    "projection (one per input, shared), re-parameterised into their weights",
)

__all__ = ["METHOD", "LinearAdapter", "RepAdapterBank", "RepAdapterConfig", "RepAdapterDelta"]
