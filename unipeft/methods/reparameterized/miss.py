"""MiSS: one small trainable shard shared by every block of a projection's weight.

Kang et al., 2024 (MiSS, formerly Bone). The input features are cut into ``⌈d_in / r⌉``
consecutive chunks of ``r`` (the last one zero-padded), and one shard ``D`` is added to
every chunk of the weight. Three variants (PEFT's ``init_weights``):

``balance`` (PEFT's default)
    ``D`` ``(r, d_out)``; ``ΔW[o, j] = D[j mod r, o]``, so
    ``y' = y + (Σ_c dropout(x)_c) D`` with ``x_c`` the ``r`` features of chunk ``c``.
``mini``
    ``D`` ``(r, mini_r)`` shared also along the outputs: ``ΔW[o, j] = D[j mod r, o mod
    mini_r]`` (``mini_r`` must divide ``d_out``).
``bat``
    ``D`` ``(d_out / r, r, r)``: the weight is cut into ``r × r`` blocks ``W_ac`` (output
    block ``a``, input block ``c``) and ``W'_ac = W_ac + W_ac D_a + D_a``: an update that
    depends on the frozen weight, read through :meth:`ModuleSite.weight_views` (the site
    kept as a plain attribute). ``r`` must divide ``d_in`` and ``d_out``. As in PEFT,
    ``dropout`` is not used by this variant.

With ``init="zeros"`` (PEFT's default) ``D = 0`` and the adapter starts as the identity;
``init="random"`` draws ``D`` kaiming-uniform (PEFT offers that for ``balance`` only). Every
variant is a fixed weight change, so all are mergeable.

Nothing is shared across sites.

PEFT equivalent: ``peft_type="MISS"``: ``r``, ``mini_r`` by name, ``miss_dropout`` ->
``dropout``, ``init_weights`` True / False / "bat" / "mini" -> ``variant="balance"`` with
``init="zeros"`` / ``variant="balance"`` with ``init="random"`` / ``variant="bat"`` /
``variant="mini"``; the tensor ``miss_block`` is this delta's ``block``, same shape. PEFT
adapts ``nn.Linear`` only.

Sites: Linear, GPT-2 ``Conv1D`` and slices of fused projections (timm's ``qkv``, GPT-2's
``c_attn``, ``nn.MultiheadAttention``'s ``in_proj_weight``; ``d_out`` is then the slice's
width). Convolutions are refused (PEFT's MiSS does not adapt them, and a chunk of ``r``
input channels has no meaning across kernel positions); sites without a weight are refused
by ``site_kinds``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import ProjectionShape, ReparameterizedDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site

Variant = Literal["balance", "bat", "mini"]


class MissConfig(DeltaConfig):
    r: int = Field(
        64, ge=1, le=4096, description="shard size along the input features (chunks of r)"
    )
    mini_r: int = Field(
        1,
        ge=1,
        le=65536,
        description="variant mini: shard size along the output features (must divide d_out)",
    )
    variant: Variant = Field(
        "balance",
        description="balance: one (r, d_out) shard for every input chunk; mini: an (r, mini_r) "
        "shard repeated along the outputs too; bat: per r x r block, W + W D + D",
    )
    init: Literal["zeros", "random"] = Field(
        "zeros",
        description="zeros: the adapter starts as the identity; random: kaiming-uniform shard",
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout on the input (balance and mini variants)"
    )


def _block_shape(cfg: MissConfig, out_features: int) -> tuple[int, ...]:
    if cfg.variant == "bat":
        return (out_features // cfg.r, cfg.r, cfg.r)
    if cfg.variant == "mini":
        return (cfg.r, cfg.mini_r)
    return (cfg.r, out_features)


class MissDelta(ReparameterizedDelta):
    """``block``: ``(r, d_out)`` (balance), ``(r, mini_r)`` (mini) or ``(d_out / r, r, r)``
    (bat), PEFT's ``miss_block`` layout."""

    def __init__(self, site: ModuleSite, cfg: MissConfig) -> None:
        super().__init__(ProjectionShape.of(site))
        self.site = site  # a plain attribute: the bat variant reads the frozen weight
        self.variant = cfg.variant
        self.r = cfg.r
        self.mini_r = cfg.mini_r
        out = self.shape.out_features
        block = torch.zeros(_block_shape(cfg, out))
        if cfg.init == "random":
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.block = nn.Parameter(block)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    # ------------------------------------------------------------------ the update

    def shard(self) -> Tensor:
        """The ``(r, d_out)`` shard every input chunk gets (balance and mini)."""
        if self.variant == "mini":
            return self.block.repeat(1, self.shape.out_features // self.mini_r)
        return self.block

    def _bat_update(self, weight: Tensor) -> Tensor:
        """``ΔW`` ``(out, in)`` of the bat variant for ``weight``: ``W_ac D_a + D_a`` per
        ``r × r`` block, in float32 or wider."""
        dtype = torch.promote_types(
            torch.promote_types(weight.dtype, self.block.dtype), torch.float32
        )
        r = self.r
        out, d_in = weight.shape
        d = self.block.to(dtype)
        w = weight.to(dtype).reshape(out // r, r, d_in // r, r)  # [a, i, c, k]
        dw = torch.einsum("aick,akm->aicm", w, d) + d[:, :, None, :]
        return dw.reshape(out, d_in)

    def _update(self, weight: Tensor) -> Tensor:
        """``ΔW`` ``(out, in)`` for ``weight`` (only bat depends on it)."""
        if self.variant == "bat":
            return self._bat_update(weight)
        d_in = self.shape.in_features
        tiled = self.shard().t().repeat(1, -(-d_in // self.r))
        return tiled[:, :d_in]

    # ------------------------------------------------------------------ forward / merge

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        if self.variant == "bat":
            weight, _ = self.site.weight_views()
            return y + F.linear(x, self._bat_update(weight).to(x.dtype)).to(y.dtype)
        h = self.dropout(x)
        pad = -h.shape[-1] % self.r
        if pad:
            h = F.pad(h, (0, pad))
        s = h.reshape(*h.shape[:-1], -1, self.r).sum(dim=-2)  # (..., r)
        return y + (s @ self.shard().to(s.dtype)).to(y.dtype)

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():
            dw = self._update(weight)
            new = weight.to(torch.promote_types(weight.dtype, dw.dtype)) + dw
        return new.to(weight.dtype), bias

    def delta_weight(self) -> Tensor:
        """``ΔW`` ``(out, in)``; for bat, of the site's current weight (read it while the
        adapter is not merged)."""
        if self.variant != "bat":
            return self._update(None)  # type: ignore[arg-type]
        weight, _ = self.site.weight_views()
        with torch.no_grad():
            return self._bat_update(weight).to(self.block.dtype)


def _build(cfg: MissConfig, site: Site) -> MissDelta:
    assert isinstance(site, ModuleSite)
    return MissDelta(site, cfg)


def _count(cfg: MissConfig, site: Site) -> int:
    assert isinstance(site, ModuleSite)
    return math.prod(_block_shape(cfg, site.features))


def _accepts(cfg: MissConfig, site: Site) -> str | None:
    if isinstance(site, ModuleSite) and site.weight is not None and site.weight.layout == "conv":
        return (
            f"{site.name!r} is a convolution; MiSS shards the input features of Linear-like "
            "projections only (as PEFT's MiSS does). Target Linear / Conv1D projections or "
            "fused q/k/v slices instead (e.g. attn.q, attn.v, mlp.up)"
        )
    return None


def _size_check(cfg: MissConfig, site: Site) -> str | None:
    if not isinstance(site, ModuleSite) or site.weight is None or site.weight.layout == "conv":
        return None
    d_in, d_out = site.weight.in_features, site.features
    if cfg.variant == "bat":
        if d_in % cfg.r or d_out % cfg.r:
            return (
                f"r={cfg.r} must divide both widths of this {d_in}->{d_out} projection for "
                f"variant 'bat' (its weight is cut into r x r blocks). Choose an r that "
                f"divides {math.gcd(d_in, d_out)}"
            )
        return None
    if cfg.r > d_in:
        return (
            f"r={cfg.r} is larger than the {d_in} input features of this projection (the "
            f"input is cut into chunks of r). Choose r <= {d_in}"
        )
    if cfg.variant == "mini" and d_out % cfg.mini_r:
        return (
            f"mini_r={cfg.mini_r} does not divide the {d_out} output features of this "
            f"projection (variant 'mini' repeats its shard along them). Choose a mini_r that "
            f"divides {d_out}"
        )
    return None


METHOD = Method(
    id="miss",
    refuses=(
        "convolutions; r above d_in (balance, mini), mini_r not dividing d_out, r not "
        "dividing both widths (bat)"
    ),
    family="reparameterized",
    config=MissConfig,
    build=_build,
    num_parameters=_count,
    formula="r · d_out per projection (balance, bat) or r · mini_r (mini)",
    site_kinds=("projection",),
    default_targets=("attn.q", "attn.v"),
    budget_field="r",
    mergeable=True,
    identity_at_init=lambda cfg: cfg.init == "zeros",
    paper="Kang et al., MiSS: Balancing LoRA Performance and Efficiency with Simple Shard "
    "Sharing, 2024, arXiv:2409.15371",
    summary="one small shard added to every chunk of the weight (balance, mini, bat); mergeable",
    accepts=_accepts,
    size_check=_size_check,
)
