"""CoCoOp: CoOp's context conditioned on the image (Zhou et al., Conditional Prompt Learning
for Vision-Language Models, CVPR 2022, arXiv:2203.05557).

Each context vector is shifted by a meta-net's output for the image being classified:

    v_m(x) = v_m + π(x),   π = Linear(d_img, d_img / r) → ReLU → Linear(d_img / r, D)

with ``x`` the (normalised) image feature and ``r`` the ``reduction`` (16 in the paper).
The class prompt ``[SOT][v_1(x)]...[v_M(x)][CLASS][.][EOT]`` then differs per image, so
the text tower runs on ``B × C`` texts for a batch of ``B`` images and ``C`` classes.

As in :mod:`~unipeft.methods.additive.coop`, the delta sits at the text tower's token
embedding (``text/embed``) and overwrites positions ``1 .. M``. It is cross-tower: the
image features come from the other tower. The CLIP head (:mod:`unipeft.clip`) hands them
over through the :class:`~unipeft.methods.additive.coop.TextConditioned` protocol
(``condition(image_features=(B, d))`` before the text forward, texts ordered image by
image: text ``b·C + c`` is image ``b`` with class ``c``). Without image features (a plain
``encode_text`` call) the meta-net reads a zero feature, so every text gets
``v_m + π(0)``.

``image_dim`` must be the width of the image features the head passes: CLIP's joint
embedding size (``embed_dim``; 512 for ViT-B/16). Its default, the text tower's width,
equals it for OpenAI's ViT CLIPs; give it otherwise (the head's call names the mismatch).

Shares nothing across sites (there is one site). No PEFT equivalent. Sites: only a CLIP
text tower's token embedding (``text/embed``); every other site is refused (use
``prompt_tuning`` elsewhere). Not mergeable; not the identity at init.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site
from .coop import ContextDelta, context_site_refusal


class CocoopConfig(DeltaConfig):
    """CoCoOp's fields (the paper's defaults: M = 4, r = 16, std 0.02)."""

    n_ctx: int = Field(
        4,
        ge=1,
        le=32,
        description="M: learned context vectors placed after SOT (texts need at least M + 2 "
        "tokens)",
    )
    image_dim: int | None = Field(
        None,
        ge=1,
        le=65536,
        description="width of the image features the meta-net reads (CLIP's embed_dim); "
        "None: the text tower's width",
    )
    reduction: int = Field(
        16, ge=1, le=65536, description="meta-net hidden width = max(1, image_dim // reduction)"
    )
    init_std: float = Field(0.02, gt=0.0, le=10.0, description="std of the context's normal init")


def _hidden(cfg: CocoopConfig, features: int) -> tuple[int, int]:
    d_img = cfg.image_dim or features
    return d_img, max(1, d_img // cfg.reduction)


class CocoopDelta(ContextDelta):
    """``ctx`` ``(M, D)`` and the meta-net ``π`` (``d_img → h → D``)."""

    image_conditioned = True

    def __init__(self, num_context: int, features: int, image_dim: int, hidden: int) -> None:
        super().__init__(num_context, features)
        self.image_dim = image_dim
        self.ctx = nn.Parameter(torch.zeros(num_context, features))
        self.meta_net = nn.Sequential(
            nn.Linear(image_dim, hidden), nn.ReLU(), nn.Linear(hidden, features)
        )

    def context(self, n: int, ref: Tensor) -> Tensor:
        feats = self._image_features
        w = self.meta_net[0].weight
        if feats is None:
            shift = self.meta_net(w.new_zeros(1, self.image_dim))
            return (self.ctx.unsqueeze(0) + shift.unsqueeze(1)).expand(n, -1, -1)
        if feats.dim() != 2 or feats.shape[1] != self.image_dim:
            raise ValueError(
                f"cocoop's meta-net reads image features of width image_dim={self.image_dim}, "
                f"got {tuple(feats.shape)}; set image_dim to the CLIP's embedding size"
            )
        b = feats.shape[0]
        if n % b:
            raise ValueError(
                f"cocoop got {b} images and {n} texts; the texts must be B × C (image by "
                "image), as the CLIP head builds them"
            )
        shift = self.meta_net(feats.to(device=w.device, dtype=w.dtype))  # (B, D)
        ctx = self.ctx.unsqueeze(0) + shift.unsqueeze(1)  # (B, M, D)
        return ctx.repeat_interleave(n // b, dim=0)


def _build(cfg: CocoopConfig, site: Site) -> CocoopDelta:
    assert isinstance(site, ModuleSite)
    d_img, hidden = _hidden(cfg, site.features)
    delta = CocoopDelta(cfg.n_ctx, site.features, d_img, hidden)
    with torch.no_grad():
        delta.ctx.normal_(0.0, cfg.init_std)
    return delta


def _count(cfg: CocoopConfig, site: Site) -> int:
    d = site.features
    d_img, h = _hidden(cfg, d)
    return cfg.n_ctx * d + d_img * h + h + h * d + d


def _accepts(cfg: CocoopConfig, site: Site) -> str | None:
    return context_site_refusal("cocoop", site)


METHOD = Method(
    id="cocoop",
    family="additive",
    config=CocoopConfig,
    build=_build,
    num_parameters=_count,
    formula="M · D + d_img · h + h + h · D + D (M: n_ctx, D: text width, d_img: image_dim, "
    "h = max(1, d_img // reduction))",
    site_kinds=("module",),
    accepts=_accepts,
    default_targets=("text/embed",),
    budget_field="n_ctx",
    mergeable=False,
    identity_at_init=False,
    paper="Zhou et al., Conditional Prompt Learning for Vision-Language Models (CoCoOp), "
    "CVPR 2022, arXiv:2203.05557",
    summary="CoOp's context plus a meta-net's shift computed from each image",
    refuses="every site but a CLIP text tower's token embedding (text/embed); texts shorter "
    "than n_ctx + 2 tokens at forward time",
)
