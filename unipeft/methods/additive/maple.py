"""MaPLe: coupled deep prompts in both towers of a CLIP (Khattak et al., MaPLe: Multi-modal
Prompt Learning, CVPR 2023, arXiv:2210.03117).

Text prompts ``P_j`` ``(M, D_txt)`` are learned for the first ``J`` layers of the text
tower; the image tower's prompts are a linear function of them,

    P̃_j = F_j(P_j) = P_j W_jᵀ + b_j      (W_j: D_vis × D_txt, one coupling per layer)

so both towers are prompted from one set of parameters. As in the paper's code:

- text, layer 0: ``P_0`` overwrites the token embeddings after SOT (positions ``1 .. M``;
  the texts hold ``M`` placeholder tokens there, which :func:`unipeft.clip.zero_shot_head`
  puts in; see :mod:`~unipeft.methods.additive.coop`);
- text, layers ``j = 1 .. J−1``: ``P_j`` overwrites the hidden states at positions
  ``1 .. M`` entering block ``j`` (a delta on block ``j − 1``'s output);
- image, layer 0: ``P̃_0`` is inserted into the image sequence (the ``visual/tokens`` site:
  after the class token; the paper appends them at the end, which is the same for a
  transformer without positional terms on the prompts and without an attention mask; one
  difference: the paper's code appends them before the tower's ``ln_pre``, here they enter
  after it, where every unipeft image-token prompt enters);
- image, layers ``j = 1 .. J−1``: ``P̃_j`` overwrites those ``M`` positions entering block
  ``j``. Past layer ``J − 1`` the prompts travel on and are dropped at the tower's end.

**Shared across sites:** the text prompts ``(J, M, D_txt)`` and the couplings ``W``
``(J, D_vis, D_txt)``, ``b`` ``(J, D_vis)`` are one adapter-wide module
(:attr:`Method.shared`); every delta (the text embedding, the image token sequence, the
blocks of both towers) reads its layer's prompt from it and trains none of its own. ``J``
is capped by the image tower's number of blocks; a block delta at the last layer passes
its output through.

Init as the paper's code: prompts normal(0, 0.02), couplings as ``nn.Linear``. Its option
of starting ``P_0`` from ``"a photo of a"`` is :func:`unipeft.clip.init_context`.

No PEFT equivalent. Sites: an open_clip CLIP's ``text/embed``, ``visual/tokens`` and the
``block`` sites of both towers (the default targets, from ``depth``); every other site is
refused, and so is an adapter missing the text embedding or the image tokens. Not
mergeable; not the identity at init. Another adapter's soft tokens at ``visual/tokens``
active at the same time would shift the image prompts' positions: run MaPLe alone there.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import AdditiveDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, SequenceSite, Site
from .coop import ContextDelta, context_site_refusal


class MapleConfig(DeltaConfig):
    """MaPLe's fields (the paper's defaults: M = 2, J = 9)."""

    n_ctx: int = Field(2, ge=1, le=32, description="M: prompt tokens per layer in each tower")
    depth: int = Field(
        9,
        ge=1,
        le=128,
        description="J: layers 0..J-1 of both towers get prompts (capped by the image "
        "tower's blocks)",
    )
    init_std: float = Field(0.02, gt=0.0, le=10.0, description="std of the prompts' init")


def _targets(cfg: MapleConfig) -> list[str]:
    blocks = [f"text/block[0:{cfg.depth - 1}]", f"visual/block[0:{cfg.depth - 1}]"]
    return ["text/embed", "visual/tokens", *(blocks if cfg.depth > 1 else [])]


def _is_image_tokens(site: Site) -> bool:
    return isinstance(site, SequenceSite) and site.role == "tokens" and site.tower == "visual"


def _is_block(site: Site) -> bool:
    return (
        isinstance(site, ModuleSite)
        and site.role == "block"
        and site.tower in ("text", "visual")
        and site.layer is not None
    )


def _geometry(cfg: MapleConfig, sites: tuple[Site, ...]) -> tuple[int, int, int, SequenceSite]:
    """``(J, D_txt, D_vis, image tokens site)`` of an adapter's sites."""
    text = [s for s in sites if context_site_refusal("maple", s) is None]
    image = [s for s in sites if _is_image_tokens(s)]
    if len(text) != 1 or len(image) != 1:
        raise ValueError(
            "maple prompts both towers of one CLIP: its targets must reach exactly one text "
            f"token embedding ('text/embed') and one image token sequence ('visual/tokens'); "
            f"got {len(text)} and {len(image)}. Leave targets at their default"
        )
    seq = image[0]
    assert isinstance(seq, SequenceSite)
    stack = getattr(seq.insert, "resblocks", None)
    layers = len(stack) if stack is not None else cfg.depth
    return min(cfg.depth, layers), text[0].features, seq.features, seq


class MaplePrompts(nn.Module):
    """The adapter-wide prompts and couplings; :meth:`image_prompts` applies ``F_j``."""

    def __init__(
        self, n_ctx: int, depth: int, d_txt: int, d_vis: int, index: int, batch_first: bool
    ) -> None:
        super().__init__()
        self.n_ctx, self.depth, self.index, self.batch_first = n_ctx, depth, index, batch_first
        self.text_prompts = nn.Parameter(torch.zeros(depth, n_ctx, d_txt))
        self.coupling_weight = nn.Parameter(torch.zeros(depth, d_vis, d_txt))
        self.coupling_bias = nn.Parameter(torch.zeros(depth, d_vis))

    def image_prompts(self) -> Tensor:
        """``(J, M, D_vis)``: ``F_j(P_j)`` for every layer."""
        out = torch.einsum("jmt,jvt->jmv", self.text_prompts, self.coupling_weight)
        return out + self.coupling_bias.unsqueeze(1)


def _shared(cfg: MapleConfig, sites: tuple[Site, ...]) -> MaplePrompts:
    depth, d_txt, d_vis, seq = _geometry(cfg, sites)
    shared = MaplePrompts(cfg.n_ctx, depth, d_txt, d_vis, seq.index, seq.batch_first)
    with torch.no_grad():
        shared.text_prompts.normal_(0.0, cfg.init_std)
        bound = 1.0 / math.sqrt(d_txt)  # nn.Linear's default init, per layer
        shared.coupling_weight.uniform_(-bound, bound)
        shared.coupling_bias.uniform_(-bound, bound)
    return shared


def _shared_count(cfg: MapleConfig, sites: tuple[Site, ...]) -> int:
    depth, d_txt, d_vis, _ = _geometry(cfg, sites)
    return depth * cfg.n_ctx * d_txt + depth * (d_vis * d_txt + d_vis)


class MapleTextContext(ContextDelta):
    """Layer 0 of the text tower: ``P_0`` after SOT."""

    def context(self, n: int, ref: Tensor) -> Tensor:
        return self.shared.text_prompts[0].unsqueeze(0).expand(n, -1, -1)

    def set_context(self, vectors: Tensor) -> None:
        with torch.no_grad():
            self.shared.text_prompts[0].copy_(vectors.to(self.shared.text_prompts.dtype))


class MapleImageTokens(AdditiveDelta):
    """Layer 0 of the image tower: ``F_0(P_0)`` inserted into the sequence."""

    def tokens(self, batch_size: int) -> Tensor:
        return self.shared.image_prompts()[0].unsqueeze(0).expand(batch_size, -1, -1)


class MapleDeepPrompt(AdditiveDelta):
    """Block ``l``'s output: positions ``start .. start + M`` become layer ``l + 1``'s
    prompt (text: ``P_{l+1}``; image: ``F_{l+1}(P_{l+1})``); the identity when
    ``l + 1 >= J``."""

    def __init__(self, layer: int, tower: str) -> None:
        super().__init__()
        self.layer, self.tower = layer, tower

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        s = self.shared
        j = self.layer + 1
        if j >= s.depth:
            return y
        start = 1 if self.tower == "text" else s.index
        h = y if s.batch_first else y.transpose(0, 1)
        if h.dim() != 3 or h.shape[1] < start + s.n_ctx:
            raise ValueError(
                f"maple writes {s.n_ctx} prompts at positions {start}..{start + s.n_ctx - 1} "
                f"of the {self.tower} sequence, which has shape {tuple(h.shape)}"
            )
        prompt = s.text_prompts[j] if self.tower == "text" else s.image_prompts()[j]
        prompt = prompt.to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)
        out = torch.cat([h[:, :start], prompt, h[:, start + s.n_ctx :]], dim=1)
        return out if s.batch_first else out.transpose(0, 1)


def _build(cfg: MapleConfig, site: Site, shared: MaplePrompts) -> AdditiveDelta:
    if _is_image_tokens(site):
        delta: AdditiveDelta = MapleImageTokens()
    elif _is_block(site):
        assert isinstance(site, ModuleSite) and site.layer is not None and site.tower
        delta = MapleDeepPrompt(site.layer, site.tower)
    else:
        assert isinstance(site, ModuleSite)
        delta = MapleTextContext(cfg.n_ctx, site.features)
    delta.use_shared(shared)
    return delta


def _count(cfg: MapleConfig, site: Site) -> int:
    return 0  # everything is in the shared module


def _accepts(cfg: MapleConfig, site: Site) -> str | None:
    if _is_image_tokens(site) or _is_block(site):
        return None
    if context_site_refusal("maple", site) is None:
        return None
    kind = f"{site.tower + '/' if site.tower else ''}{getattr(site, 'role', None) or site.kind}"
    return (
        f"maple prompts an open_clip CLIP's two towers through 'text/embed', "
        f"'visual/tokens' and the 'block' sites of both towers; {site.name!r} ({kind}) is "
        "none of them. Keep the default targets (set depth instead); for deep prompts on "
        "one vision tower use a VPT-deep method"
    )


METHOD = Method(
    id="maple",
    family="additive",
    config=MapleConfig,
    build=_build,
    num_parameters=_count,
    formula="adapter-wide: J · M · D_txt + J · (D_vis · D_txt + D_vis) (J: depth capped by "
    "the image blocks, M: n_ctx, D_txt / D_vis: the towers' widths); 0 per site",
    site_kinds=("module", "sequence"),
    accepts=_accepts,
    default_targets=_targets,
    budget_field="n_ctx",
    mergeable=False,
    identity_at_init=False,
    paper="Khattak et al., MaPLe: Multi-modal Prompt Learning, CVPR 2023, arXiv:2210.03117",
    summary="deep prompts in both CLIP towers, the image ones coupled to the text ones",
    refuses="every site but an open_clip CLIP's text/embed, visual/tokens and block sites; "
    "an adapter without both text/embed and visual/tokens",
    shared=_shared,
    shared_parameters=_shared_count,
)
