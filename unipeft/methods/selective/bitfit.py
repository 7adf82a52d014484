"""BitFit: tune only the bias terms (Ben Zaken et al., 2022).

The backbone's biases stay frozen; the delta holds their change and adds it to the site's
output, so disabling, merging and unloading are exact. A projection without a bias (Llama's
Linear layers) gets one, starting at zero; norms without a bias (RMSNorm) are skipped.
"""

from __future__ import annotations

from pydantic import Field

from ...contract.config import DeltaConfig
from ...contract.deltas import SelectiveDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site

ALL_BIAS_SITES = (
    "attn.q?",
    "attn.k?",
    "attn.v?",
    "attn.out?",
    "mlp.up?",
    "mlp.gate?",
    "mlp.down?",
    "norm?",
)


class BitFitConfig(DeltaConfig):
    """BitFit has no hyperparameters beyond its targets."""

    include_missing: bool = Field(
        True, description="add a zero-initialised bias to projections that have none"
    )


class BitFitDelta(SelectiveDelta):
    """The change of one bias vector (its slice, for fused projections)."""

    def __init__(self, features: int, channel_dim: int = -1) -> None:
        super().__init__("bias", (features,), channel_dim=channel_dim)


def _build(cfg: BitFitConfig, site: Site) -> BitFitDelta:
    assert isinstance(site, ModuleSite)
    return BitFitDelta(site.features, site.channel_dim)


def _count(cfg: BitFitConfig, site: Site) -> int:
    assert isinstance(site, ModuleSite)
    return site.features


def _accepts(cfg: BitFitConfig, site: Site) -> str | None:
    assert isinstance(site, ModuleSite)
    if site.entry is not None:
        return f"{site.name!r} is a sublayer path, not a module with a bias"
    if site.features <= 0:
        return f"the width of {site.name!r}'s output is unknown"
    has_bias = site.parameter("bias") is not None
    if site.weight is not None:
        if not has_bias and not cfg.include_missing:
            return f"{site.name!r} has no bias (set include_missing=True to add one)"
        return None
    if not has_bias:
        return f"{site.name!r} has no bias parameter"
    return None


METHOD = Method(
    id="bitfit",
    family="selective",
    config=BitFitConfig,
    build=_build,
    num_parameters=_count,
    formula="d_out per biased site (the bias vector, or its slice of a fused projection)",
    site_kinds=("module",),
    default_targets=ALL_BIAS_SITES,
    mergeable=True,
    identity_at_init=True,
    paper="Ben Zaken et al., BitFit: Simple Parameter-efficient Fine-tuning for "
    "Transformer-based Masked Language-models, 2022, arXiv:2106.10199",
    summary="tunes bias terms only; mergeable",
    accepts=_accepts,
)
