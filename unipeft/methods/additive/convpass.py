"""Convpass: a convolutional bypass beside a ViT block's attention and MLP (Jie & Deng,
2022).

Beside each sublayer ``f`` (attention, MLP) of a vision transformer block, fed with the
same input ``h`` (the normed tokens, ``(B, L, d)``), Convpass adds

    z = act(h W_down + b_down)                       (B, L, b)
    z_patch = conv3x3(grid(z_patch))                 the patch tokens as a (b, g, g) image
    z_prefix = conv3x3 of each prefix token alone    a 1x1 image: only the centre tap
    y' = f(h) + s · (dropout(act(z)) W_up + b_up)

``act`` is QuickGELU (``x σ(1.702 x)``, the paper's) or GELU, ``s`` the scale (0.01 in the
paper's ViT experiments), ``b`` the bottleneck width (8). The 3x3 convolution is
``b -> b`` with padding 1, shared by the patch grid and the class (and other prefix)
tokens, which the paper's code convolves each as a one-pixel image. ``W_down`` starts
Xavier-uniform, the convolution Xavier-uniform (``conv_init="xavier"``) or as the identity
on its centre tap (``"identity"``), the biases and ``W_up`` at zero: the adapter starts as
the identity.

The grid is inferred at run time from the token count ``L``: the patches are the last
``g²`` tokens with ``g = ⌊√L⌋``, the ``p = L - g²`` tokens before them are prefix tokens
(class token, registers). A ``p`` above ``max_prefix_tokens`` means the patches do not
form a square grid (a non-square image), which raises an error naming the token count.

Paper: Jie, Deng, *Convolutional Bypasses Are Better Vision Transformer Adapters*, 2022,
arXiv:2207.07039.

Shared across sites: nothing. PEFT equivalent: none (PEFT has no Convpass type).

Sites: the ``attn`` and ``mlp`` sublayers (the default) and ``block`` sites of vision
transformers: timm ViTs, Hugging Face ViT-family image models and open_clip's image tower.
Refused at apply time: text models and open_clip's text tower (their tokens have no 2-D
grid), VideoMAE (its tubelet tokens lie on a 3-D ``(t, g, g)`` grid that the token count
alone does not determine; a per-frame 2-D bypass would need the frame count), models the
method does not recognise as vision transformers, projections (Convpass bypasses a
sublayer), and ``nn.MultiheadAttention`` with ``batch_first=False``.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import AdditiveDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site

_VISION = re.compile(
    r"^timm\.|^transformers\.models\.(vit\w*|deit|beit|dinov2\w*|dinov3\w*|ijepa|data2vec"
    r"|dpt|yolos|vitdet)\."
)
_VIDEO = re.compile(r"video|vivit|timesformer", re.IGNORECASE)


class ConvpassConfig(DeltaConfig):
    """Convpass's fields (the paper's ViT values as defaults)."""

    bottleneck: int = Field(8, ge=1, le=4096, description="channels b of the bypass")
    scale: float = Field(0.01, gt=0.0, le=100.0, description="factor s on the bypass's output")
    activation: Literal["quick_gelu", "gelu"] = Field(
        "quick_gelu", description="nonlinearity after the down projection and the convolution"
    )
    conv_init: Literal["xavier", "identity"] = Field(
        "xavier",
        description="init of the 3x3 convolution: Xavier-uniform, or the identity on its "
        "centre tap (both start the adapter as the identity: W_up is zero)",
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout before the up projection")
    max_prefix_tokens: int = Field(
        8,
        ge=1,
        le=1024,
        description="most tokens allowed before the square patch grid (class token, "
        "registers); more means the grid is not square and the call fails",
    )


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def square_grid(length: int, max_prefix: int) -> tuple[int, int]:
    """``(p, g)``: prefix tokens and the side of the square patch grid of ``length`` tokens."""
    g = math.isqrt(length)
    p = length - g * g
    if g == 0 or p > max_prefix:
        raise ValueError(
            f"convpass: {length} tokens are not a square grid of patches after at most "
            f"{max_prefix} prefix tokens (⌊√{length}⌋² = {g * g} leaves {p}); Convpass needs "
            "a square patch grid (raise max_prefix_tokens if the model has more prefix tokens)"
        )
    return p, g


class ConvpassDelta(AdditiveDelta):
    """``y + s · up(dropout(act(conv(act(down(h))))))`` with ``h`` the sublayer's input."""

    def __init__(self, in_features: int, out_features: int, cfg: ConvpassConfig) -> None:
        super().__init__(placement="parallel", scaling=cfg.scale)
        b = cfg.bottleneck
        self.down = nn.Linear(in_features, b)
        self.conv = nn.Conv2d(b, b, 3, padding=1)
        self.up = nn.Linear(b, out_features)
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation = cfg.activation
        self.max_prefix_tokens = cfg.max_prefix_tokens
        with torch.no_grad():
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.zeros_(self.down.bias)
            if cfg.conv_init == "xavier":
                nn.init.xavier_uniform_(self.conv.weight)
            else:
                self.conv.weight.zero_()
                self.conv.weight[:, :, 1, 1] = torch.eye(b)
            nn.init.zeros_(self.conv.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def act(self, t: Tensor) -> Tensor:
        return quick_gelu(t) if self.activation == "quick_gelu" else F.gelu(t)

    def transform(self, h: Tensor) -> Tensor:
        if h.ndim == 4:  # a ConvNet's channels-last feature map (batch, height, width, channels)
            z = self.act(self.down(h))
            z = self.conv(z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            return self.up(self.dropout(self.act(z)))
        if h.ndim != 3:
            raise ValueError(
                "convpass expects tokens (batch, length, channels) or a channels-last feature "
                f"map (batch, height, width, channels), got shape {tuple(h.shape)}"
            )
        n, length, _ = h.shape
        p, g = square_grid(length, self.max_prefix_tokens)
        z = self.act(self.down(h))
        grid = z[:, p:].transpose(1, 2).reshape(n, -1, g, g)
        patches = self.conv(grid).flatten(2).transpose(1, 2)
        # a prefix token alone is a 1x1 image: with padding 1 only the centre tap sees it
        prefix = F.linear(z[:, :p], self.conv.weight[:, :, 1, 1], self.conv.bias)
        z = self.act(torch.cat([prefix, patches], dim=1))
        return self.up(self.dropout(z))


def _owner(site: ModuleSite) -> nn.Module:
    return site.entry if site.entry is not None else site.module


def _accepts(cfg: ConvpassConfig, site: Site) -> str | None:
    if not isinstance(site, ModuleSite):
        return f"{site.name!r} is a token sequence; Convpass runs beside a sublayer"
    if site.role not in ("attn", "mlp", "block"):
        return (
            f"{site.name!r} ({site.role or 'a module by name'}) is not a sublayer: Convpass "
            "is a bypass beside a block's attention or MLP. Target attn, mlp or block"
        )
    owner = _owner(site)
    where = f"{type(owner).__module__}.{type(owner).__name__}"
    if site.channel_dim != -1:
        return (
            f"{site.name!r} puts out a channels-first feature map; Convpass's projections "
            "read channels last (tokens, or a ConvNeXt MLP with linear layers)"
        )
    if site.tower == "text":
        return (
            f"{site.name!r} is in a text tower: its tokens have no 2-D patch grid for "
            "Convpass's 3x3 convolution. Use adaptformer or bottleneck_adapter on text"
        )
    if _VIDEO.search(where):
        return (
            f"{site.name!r} ({type(owner).__name__}) is in a video model: its tubelet tokens "
            "lie on a (time, height, width) grid that Convpass's 2-D convolution does not "
            "cover. Use adaptformer or bottleneck_adapter on video models"
        )
    if isinstance(owner, nn.MultiheadAttention) and not owner.batch_first:
        return (
            f"{site.name!r}: nn.MultiheadAttention with batch_first=False passes tokens "
            "sequence-first; Convpass reads (batch, length, channels)"
        )
    if site.tower != "visual" and not _VISION.search(where):
        return (
            f"{site.name!r} ({where}) is not in a vision transformer Convpass recognises "
            "(timm ViTs, Hugging Face ViT-family image models, open_clip's image tower): a "
            "text model's tokens have no 2-D patch grid. Use adaptformer or "
            "bottleneck_adapter there"
        )
    if site.features <= 0:
        return f"the width of {site.name!r}'s output is unknown"
    return None


def _build(cfg: ConvpassConfig, site: Site) -> ConvpassDelta:
    assert isinstance(site, ModuleSite)
    return ConvpassDelta(site.features, site.features, cfg)


def _count(cfg: ConvpassConfig, site: Site) -> int:
    assert isinstance(site, ModuleSite)
    d, b = site.features, cfg.bottleneck
    return (d * b + b) + (9 * b * b + b) + (b * d + d)


METHOD = Method(
    id="convpass",
    family="additive",
    config=ConvpassConfig,
    build=_build,
    num_parameters=_count,
    formula="d · b + b + 9 b² + b + b · d + d per sublayer (b: bottleneck, d: width)",
    site_kinds=("module",),
    accepts=_accepts,
    refuses="text models and open_clip's text tower (no 2-D patch grid), video models "
    "(VideoMAE's tubelets), models not recognised as vision transformers, sites other than "
    "attn, mlp and block; at run time, token counts that are not a square patch grid after "
    "at most max_prefix_tokens",
    default_targets=("attn?", "mlp?"),
    budget_field="bottleneck",
    mergeable=False,
    identity_at_init=True,
    paper="Jie, Deng, Convolutional Bypasses Are Better Vision Transformer Adapters, 2022, "
    "arXiv:2207.07039",
    summary="a bottleneck with a 3x3 convolution over the patch grid, beside each attention "
    "and MLP sublayer of a vision transformer",
)

__all__ = ["METHOD", "ConvpassConfig", "ConvpassDelta"]
