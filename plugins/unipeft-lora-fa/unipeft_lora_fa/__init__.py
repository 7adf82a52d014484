"""LoRA-FA for unipeft: LoRA with its down-projection frozen (Zhang et al., 2023).

LoRA adds ``ΔW = s · B A`` to a projection and trains both factors. LoRA-FA ("LoRA with a
Frozen-A") keeps ``A`` at its random initialisation and trains only ``B``, which starts at
zero, so the adapter is the identity at init:

    y' = y + s · B (A x),    s = alpha / r  (alpha / sqrt(r) with use_rslora)

With ``A`` frozen, the backward pass never needs the layer's input ``x`` for ``A``'s
gradient, only the ``r``-wide activation ``A x``: that is the memory the method saves. The
update stays a fixed weight change, so the adapter merges into the projection like LoRA's.

This distribution adds it to unipeft purely through the ``unipeft`` entry-point group and
public names: it builds on :class:`unipeft.blocks.LowRankDelta` (LoRA's update) and turns
its ``A`` into a persistent buffer. ``A`` is drawn from torch's global random generator, so
it cannot be rebuilt from the config: as a persistent buffer it is saved and loaded with the
adapter, but never trained or counted.

Usage::

    import unipeft

    model = unipeft.apply(backbone, "lora_fa", r=8)  # targets attn.q, attn.v
    model.merge()  # fold s · B A into the projections' weights

Paper: Zhang et al., *LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language
Models Fine-tuning*, 2023, arXiv:2308.03303.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import Field

import unipeft
from unipeft import Method, ModuleSite, ProjectionShape, Site
from unipeft.blocks import LowRankConfig, LowRankDelta, low_rank_refusal

__version__ = "0.1.0"

DEFAULT_TARGETS = ("attn.q", "attn.v")


class LoraFaConfig(LowRankConfig):
    """LoRA's fields (``r``, ``alpha``, ``dropout``, ``use_rslora``, ``init``); ``init`` is
    that of the frozen ``A``."""

    init: Literal["kaiming", "gaussian", "orthogonal"] = Field(
        "kaiming",
        description="init of the frozen A; B starts at zero, so the adapter is the identity "
        "at init",
    )


class LoraFaDelta(LowRankDelta):
    """``y + s · B A dropout(x)`` with ``A`` a persistent buffer: only ``B`` trains.

    ``A`` ``(r, in, *kernel)``, ``B`` ``(out, r)``. Everything else (the forward on Linear
    and convolution layouts, ``delta_weight``, ``merged``) is :class:`LowRankDelta`'s.
    """

    def __init__(self, shape: ProjectionShape, cfg: LoraFaConfig) -> None:
        super().__init__(shape, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.init)
        a = self.A.detach()
        del self.A  # the trainable parameter LowRankDelta made...
        self.register_buffer("A", a)  # ...becomes a persistent buffer: saved, never trained


def _build(cfg: LoraFaConfig, site: Site) -> LoraFaDelta:
    assert isinstance(site, ModuleSite)
    return LoraFaDelta(ProjectionShape.of(site), cfg)


def _count(cfg: LoraFaConfig, site: Site) -> int:
    assert isinstance(site, ModuleSite)
    return cfg.r * ProjectionShape.of(site).out_features  # B only; A is frozen


def _accepts(cfg: LoraFaConfig, site: Site) -> str | None:
    # a sublayer path has no one weight to add B A to
    if not isinstance(site, ModuleSite) or site.entry is not None:
        return f"{site.name!r} is not a single projection"
    return None


def _rank_fits(cfg: LoraFaConfig, site: Site) -> str | None:
    return low_rank_refusal("r", cfg.r, site)


METHOD = Method(
    id="lora_fa",
    family="reparameterized",
    config=LoraFaConfig,
    build=_build,
    num_parameters=_count,
    formula="r · d_out per projection (B; the frozen A is a saved buffer, not counted)",
    site_kinds=("projection",),
    default_targets=DEFAULT_TARGETS,
    mergeable=True,
    identity_at_init=True,
    paper="Zhang et al., LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language "
    "Models Fine-tuning, 2023, arXiv:2308.03303",
    summary="LoRA with A frozen at its random init; only B trains; mergeable",
    accepts=_accepts,
    size_check=_rank_fits,
    budget_field="r",
)


@unipeft.hookimpl
def register_methods(register: Callable[[Method], None]) -> None:
    """Called by unipeft when it builds its registry (entry point ``lora_fa`` in group
    unipeft)."""
    register(METHOD)


__all__ = ["DEFAULT_TARGETS", "METHOD", "LoraFaConfig", "LoraFaDelta", "register_methods"]
