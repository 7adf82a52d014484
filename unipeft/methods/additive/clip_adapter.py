"""CLIP-Adapter: a residual-blended bottleneck on a CLIP tower's output features (Gao et
al., CLIP-Adapter: Better Vision-Language Models with Feature Adapters, IJCV 2023,
arXiv:2110.04544).

    f' = α · A(f) + (1 − α) · f,   A = Linear(d, d/r) → ReLU → Linear(d/r, d) → ReLU

with ``f`` the tower's (projected, not yet normalised) feature, ``d`` its width, ``r`` the
``reduction`` (4 in the paper's code, no biases; ``bottleneck`` sets ``d/r`` directly) and
``α`` the residual ratio (0.2 for generic image classification). The paper's best
setting adapts the image features only (the default target ``visual``, the image tower
of an open_clip CLIP); the text tower's
output is reached where it is a module (``text`` of an open_clip ``CustomTextCLIP``);
plain ``CLIP`` computes its text feature inline, so no site holds it there. With the CLIP
head (:mod:`unipeft.clip`) the text features are computed once when only the image side
is adapted.

Initialisation: PyTorch's default (Kaiming-uniform) for both layers, as the paper's code,
except that the rows of the first layer come in mirrored pairs (``w``, ``−w``), so that for
any feature half of the hidden ReLUs are active at the start; without biases, a narrow
bottleneck (the tiny backbones' 4 units) otherwise often starts with every unit dead and
never trains. The bottleneck has at least 2 units for the same reason.

Shares nothing across sites. No PEFT equivalent. Sites: a module whose output is a CLIP
tower's feature (an open_clip tower: it has ``output_dim``); every other site is refused
(use ``bottleneck_adapter`` inside transformer blocks). Not mergeable (a non-linear
function of the feature); not the identity at init (``α > 0``).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import AdditiveDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site


class ClipAdapterConfig(DeltaConfig):
    """CLIP-Adapter's fields (the paper's code: reduction 4, ratio 0.2)."""

    reduction: int = Field(
        4, ge=1, le=65536, description="bottleneck width = max(2, d // reduction)"
    )
    bottleneck: int | None = Field(
        None,
        ge=2,
        le=65536,
        description="bottleneck width, overriding reduction (None: max(2, d // reduction))",
    )
    alpha: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        description="residual ratio α: f' = α·A(f) + (1 − α)·f (1: the adapter alone)",
    )


def _width(site: Site) -> int:
    return int(getattr(getattr(site, "module", None), "output_dim", 0) or 0)


class ClipAdapterDelta(AdditiveDelta):
    """``A``: two bias-free linear layers, each followed by a ReLU."""

    def __init__(self, features: int, hidden: int, alpha: float) -> None:
        super().__init__(placement="serial", scaling=alpha)
        self.alpha = alpha
        self.down = nn.Linear(features, hidden, bias=False)
        self.up = nn.Linear(hidden, features, bias=False)
        with torch.no_grad():  # mirrored pairs: half the hidden units fire for any input
            pairs = hidden // 2
            self.down.weight[pairs : 2 * pairs] = -self.down.weight[:pairs]

    def transform(self, h: Tensor) -> Tensor:
        return torch.relu(self.up(torch.relu(self.down(h))))

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        return self.alpha * self.transform(y) + (1.0 - self.alpha) * y


def _hidden(cfg: ClipAdapterConfig, d: int) -> int:
    return cfg.bottleneck or max(2, d // cfg.reduction)


def _build(cfg: ClipAdapterConfig, site: Site) -> ClipAdapterDelta:
    d = _width(site)
    return ClipAdapterDelta(d, _hidden(cfg, d), cfg.alpha)


def _count(cfg: ClipAdapterConfig, site: Site) -> int:
    d = _width(site)
    return 2 * d * _hidden(cfg, d)


def _accepts(cfg: ClipAdapterConfig, site: Site) -> str | None:
    if isinstance(site, ModuleSite) and site.out_slice is None and _width(site) > 0:
        return None
    role = getattr(site, "role", None) or site.kind
    return (
        f"clip_adapter transforms a CLIP tower's output feature, so it attaches only to an "
        f"open_clip tower module (one with output_dim: target 'visual' for the image tower, "
        f"'text' for a CustomTextCLIP's text tower); {site.name!r} ({role}) is not one. "
        "Inside transformer blocks use bottleneck_adapter"
    )


METHOD = Method(
    id="clip_adapter",
    family="additive",
    config=ClipAdapterConfig,
    build=_build,
    num_parameters=_count,
    formula="2 · d · h per tower (d: the tower's output width; h: bottleneck, or "
    "max(2, d // reduction))",
    site_kinds=("module",),
    accepts=_accepts,
    default_targets=("visual?",),  # optional: "match nothing" on backbones without one
    budget_field="bottleneck",
    mergeable=False,
    identity_at_init=False,
    paper="Gao et al., CLIP-Adapter: Better Vision-Language Models with Feature Adapters, "
    "IJCV 2023, arXiv:2110.04544",
    summary="a bottleneck MLP on CLIP's image (or text) feature, blended with the feature",
    refuses="every site but an open_clip tower's output (a module with output_dim)",
)
