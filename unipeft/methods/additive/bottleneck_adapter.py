"""Bottleneck adapters: serial (Houlsby et al., 2019; Pfeiffer et al., 2021) and parallel
(He et al., 2022). ``h -> up(act(down(h)))`` added to a sublayer's output."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import AdditiveDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
_PLACEMENT_TARGETS = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",), "parallel": ("mlp",)}


class BottleneckAdapterConfig(DeltaConfig):
    bottleneck: int = Field(16, ge=1, le=65536, description="width of the bottleneck")
    placement: Literal["houlsby", "pfeiffer", "parallel"] = Field(
        "houlsby",
        description="houlsby: serial after attention and MLP; pfeiffer: serial after the MLP; "
        "parallel: beside the MLP, fed with its input",
    )
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="nonlinearity")
    scaling: float = Field(1.0, gt=0, le=100, description="factor on the adapter's output")
    init_std: float = Field(
        0.01, gt=0, le=1, description="std of the down projection; up starts at zero (identity)"
    )


class BottleneckAdapterDelta(AdditiveDelta):
    """``y + s · up(act(down(h)))`` with ``h = y`` (serial) or the site input (parallel)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bottleneck: int,
        *,
        placement: Literal["serial", "parallel"],
        activation: str,
        scaling: float,
        init_std: float,
        channel_dim: int = -1,
    ) -> None:
        super().__init__(placement, scaling, channel_dim)
        self.down = nn.Linear(in_features, bottleneck)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, out_features)
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def transform(self, h: Tensor) -> Tensor:
        return self.up(self.act(self.down(h)))


def _dims(cfg: BottleneckAdapterConfig, site: ModuleSite) -> tuple[int, int]:
    out = site.features
    if cfg.placement != "parallel":
        return out, out
    # a parallel adapter reads the site's input: a projection's in_features, else a
    # sublayer's input, which in a transformer block has the width of its output
    return (site.in_features or out), out


def _build(cfg: BottleneckAdapterConfig, site: Site) -> BottleneckAdapterDelta:
    assert isinstance(site, ModuleSite)
    d_in, d_out = _dims(cfg, site)
    return BottleneckAdapterDelta(
        d_in,
        d_out,
        cfg.bottleneck,
        placement="parallel" if cfg.placement == "parallel" else "serial",
        activation=cfg.activation,
        scaling=cfg.scaling,
        init_std=cfg.init_std,
        channel_dim=site.channel_dim,
    )


def _count(cfg: BottleneckAdapterConfig, site: Site) -> int:
    assert isinstance(site, ModuleSite)
    d_in, d_out = _dims(cfg, site)
    return d_in * cfg.bottleneck + cfg.bottleneck + cfg.bottleneck * d_out + d_out


def _accepts(cfg: BottleneckAdapterConfig, site: Site) -> str | None:
    if isinstance(site, ModuleSite) and site.features <= 0:
        return f"the width of {site.name!r}'s output is unknown"
    return None


METHOD = Method(
    id="bottleneck_adapter",
    family="additive",
    config=BottleneckAdapterConfig,
    build=_build,
    num_parameters=_count,
    formula="d_in · b + b + b · d_out + d_out per site (b: bottleneck; d_in = d_out when serial)",
    site_kinds=("module",),
    default_targets=lambda cfg: _PLACEMENT_TARGETS[cfg.placement],
    budget_field="bottleneck",
    mergeable=False,
    identity_at_init=True,
    paper="Houlsby et al., Parameter-Efficient Transfer Learning for NLP, 2019, "
    "arXiv:1902.00751; He et al., Towards a Unified View of PETL, 2022, arXiv:2110.04366",
    summary="bottleneck MLP after (serial) or beside (parallel) a sublayer",
    accepts=_accepts,
)

__all__ = ["METHOD", "BottleneckAdapterConfig", "BottleneckAdapterDelta"]
