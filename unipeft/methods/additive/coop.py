"""CoOp: learned context vectors in front of the class name, in a CLIP text tower (Zhou et
al., Learning to Prompt for Vision-Language Models, IJCV 2022, arXiv:2109.01134).

A class prompt is ``[SOT][V1]...[VM][CLASS][.][EOT]``: the ``M`` context vectors ``V``
replace the word embeddings of a hand-written template ("a photo of a") and are learned;
the class-name tokens and the rest of the text stay the backbone's. This module does what
the paper's own code does: the delta sits at the text tower's token embedding (site role
``embed``, tower ``text``: ``token_embedding`` of an open_clip CLIP) and overwrites the
embeddings at positions ``1 .. M`` (right after SOT) with the context,

    e'[:, 0] = e[:, 0],   e'[:, 1:1+M] = V,   e'[:, 1+M:] = e[:, 1+M:]

so the positional embeddings, the causal mask and CLIP's pooling at the EOT token are
exactly those of a text with ``M`` placeholder words after SOT. The texts must therefore
hold ``M`` placeholder tokens after SOT (any token id; their embeddings are replaced):
:func:`unipeft.clip.zero_shot_head` builds such texts from class names. A text shorter
than ``M + 2`` tokens is refused at forward time.

Unified context (default, ``n_classes=0``): one ``V`` ``(M, D)`` for every class.
Class-specific context (``n_classes=C``): one ``V_c`` per class, ``(C, M, D)``; the delta
must know which class each text is, which the CLIP head tells it through the
:class:`TextConditioned` protocol below (``condition(classes=...)``). Without it (a plain
``encode_text`` call) every text gets the mean of the class contexts.

Initialisation: normal(0, ``init_std``) as in the paper (std 0.02); the paper's option of
starting from a phrase's word embeddings (``ctx_init="a photo of a"``, ``M`` = its number
of tokens) is :func:`unipeft.clip.init_context`, which needs the tokenizer.

Shares nothing across sites (there is one site). No PEFT equivalent (PEFT has no CoOp).
Sites: only a CLIP text tower's token embedding (``text/embed``); every other site (BERT's
embeddings, any projection, the ``tokens`` sequences) is refused: use ``prompt_tuning``
there. Not mergeable (the context replaces inputs); not the identity at init.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import AdditiveDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site


@runtime_checkable
class TextConditioned(Protocol):
    """A text-side delta whose output depends on more than the text: which class each text
    sequence is (CoOp's class-specific context) or which image it is paired with (CoCoOp).

    A caller (the CLIP head, :mod:`unipeft.clip`) calls :meth:`condition` right before a text
    forward and ``condition()`` (clearing) right after. ``num_context`` is the number of
    placeholder tokens the texts must hold after SOT.
    """

    num_context: int

    def condition(
        self, classes: Tensor | None = None, image_features: Tensor | None = None
    ) -> None:
        """``classes``: ``(N,)`` class index of each of the ``N`` text sequences;
        ``image_features``: ``(B, d)`` image features, the texts being ``B × C`` sequences
        ordered image by image (sequence ``b·C + c``: image ``b``, class ``c``)."""
        ...


class CoopConfig(DeltaConfig):
    """CoOp's fields (the paper's defaults: M = 16 on ImageNet, 4 in the few-shot
    base-to-novel setting of CoCoOp; std 0.02)."""

    n_ctx: int = Field(
        4,
        ge=1,
        le=32,
        description="M: learned context vectors placed after SOT (the texts need M "
        "placeholder tokens there, and at least M + 2 tokens in all)",
    )
    n_classes: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="0: one context shared by every class (unified); C > 0: class-specific "
        "contexts, one set per class, the class of each text given by the CLIP head",
    )
    init_std: float = Field(0.02, gt=0.0, le=10.0, description="std of the normal init")


def context_site_refusal(method: str, site: Site) -> str | None:
    """Why ``site`` is not a CLIP text tower's token embedding (None when it is)."""
    if (
        isinstance(site, ModuleSite)
        and site.role == "embed"
        and site.tower == "text"
        and isinstance(site.module, nn.Embedding)
    ):
        return None
    kind = f"{site.tower + '/' if site.tower else ''}{getattr(site, 'role', None) or site.kind}"
    return (
        f"{method} learns the context words of a CLIP text prompt, so it attaches only to a "
        f"CLIP text tower's token embedding (target 'text/embed', an nn.Embedding); "
        f"{site.name!r} is a site of role {kind}. For soft prompts on other backbones use "
        "prompt_tuning (or prefix/p-tuning methods)"
    )


class ContextDelta(AdditiveDelta):
    """Overwrites the token embeddings at positions ``1 .. M`` with learned context vectors.

    Subclasses give the per-sequence context through :meth:`context`.
    """

    def __init__(self, num_context: int, features: int) -> None:
        super().__init__()
        self.num_context = num_context
        self.features = features
        self._classes: Tensor | None = None
        self._image_features: Tensor | None = None

    def condition(
        self, classes: Tensor | None = None, image_features: Tensor | None = None
    ) -> None:
        """See :class:`TextConditioned`."""
        self._classes = classes
        self._image_features = image_features

    image_conditioned = False
    """Whether the context depends on the image (the head then runs ``B × C`` texts)."""

    def set_context(self, vectors: Tensor) -> None:
        """Start every context from ``vectors`` ``(M, D)`` (a phrase's word embeddings)."""
        ctx = self.get_parameter("ctx")
        with torch.no_grad():
            ctx.copy_(vectors.to(ctx.dtype).expand_as(ctx))

    def context(self, n: int, ref: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``(n, M, D)``: the context of each of ``n`` text sequences."""
        raise NotImplementedError

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        m = self.num_context
        if y.dim() != 3 or y.shape[1] < m + 2:
            raise ValueError(
                f"{type(self).__name__} writes {m} context vectors after SOT, so each text "
                f"needs at least {m + 2} tokens (SOT, {m} placeholders, EOT); got token "
                f"embeddings of shape {tuple(y.shape)}. Tokenize with a longer context "
                "length or use fewer context vectors (n_ctx)"
            )
        ctx = self.context(y.shape[0], y).to(y.dtype)
        return torch.cat([y[:, :1], ctx, y[:, 1 + m :]], dim=1)


class CoopDelta(ContextDelta):
    """``ctx`` ``(M, D)`` (unified) or ``(C, M, D)`` (class-specific)."""

    def __init__(self, num_context: int, features: int, n_classes: int = 0) -> None:
        super().__init__(num_context, features)
        self.n_classes = n_classes
        shape = (n_classes, num_context, features) if n_classes else (num_context, features)
        self.ctx = nn.Parameter(torch.zeros(shape))

    def context(self, n: int, ref: Tensor) -> Tensor:
        if not self.n_classes:
            return self.ctx.unsqueeze(0).expand(n, -1, -1)
        classes = self._classes
        if classes is None:
            return self.ctx.mean(0, keepdim=True).expand(n, -1, -1)
        if classes.shape != (n,):
            raise ValueError(
                f"condition(classes=...) gave {tuple(classes.shape)} class indices for a text "
                f"batch of {n} sequences; give one class index per sequence"
            )
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= self.n_classes):
            raise ValueError(
                f"class indices must lie in 0..{self.n_classes - 1} (n_classes="
                f"{self.n_classes}); got {int(classes.min())}..{int(classes.max())}"
            )
        return self.ctx[classes.to(self.ctx.device)]


def _build(cfg: CoopConfig, site: Site) -> CoopDelta:
    assert isinstance(site, ModuleSite)
    delta = CoopDelta(cfg.n_ctx, site.features, cfg.n_classes)
    with torch.no_grad():
        delta.ctx.normal_(0.0, cfg.init_std)
    return delta


def _count(cfg: CoopConfig, site: Site) -> int:
    return cfg.n_ctx * site.features * max(1, cfg.n_classes)


def _accepts(cfg: CoopConfig, site: Site) -> str | None:
    return context_site_refusal("coop", site)


METHOD = Method(
    id="coop",
    family="additive",
    config=CoopConfig,
    build=_build,
    num_parameters=_count,
    formula="M · D · max(1, C) (M: n_ctx, D: text width, C: n_classes; 0 = unified context)",
    site_kinds=("module",),
    accepts=_accepts,
    default_targets=("text/embed",),
    budget_field="n_ctx",
    mergeable=False,
    identity_at_init=False,
    paper="Zhou et al., Learning to Prompt for Vision-Language Models (CoOp), IJCV 2022, "
    "arXiv:2109.01134",
    summary="learned context words before the class name in a CLIP text prompt",
    refuses="every site but a CLIP text tower's token embedding (text/embed); texts shorter "
    "than n_ctx + 2 tokens at forward time",
)
