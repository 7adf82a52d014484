"""The CLIP classifier head: class names become text features; images are classified by
cosine similarity with them, as in CLIP's zero-shot recipe.

``logits = exp(logit_scale) · norm(f_img) · norm(t_c)ᵀ`` where ``t_c`` is the mean of the
normalised text features of class ``c``'s prompts (one per template), normalised again.

The head runs the model's ``encode_image`` and ``encode_text``, so a unipeft
:class:`~unipeft.DeltaModel`'s active adapters run in both towers. Adapters that learn the
prompt's context (``coop``, ``cocoop``: deltas implementing
:class:`~unipeft.methods.additive.coop.TextConditioned`) replace the template: the texts are
then ``learned_template`` (``"{}."``) with the context's placeholder tokens after SOT, and
the head tells those deltas which class each text is (class-specific CoOp) and which image
features condition them (CoCoOp, where the text tower runs on ``B × C`` texts).

The class text features are cached. The cache key is the active adapters, the merged
adapters, and the identity, version counter and ``requires_grad`` of every tensor of the
active adapters' text-tower deltas (and of their shared modules): an optimizer step, a
``load_state_dict`` or ``set_active`` changes it. While such a tensor trains (it requires
grad and autograd is on) the features are recomputed on every call, with gradients. What
the key cannot see (``model.disable()``, backbone weights edited in place) needs
:meth:`ClipHead.refresh`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..methods.additive.coop import TextConditioned
from ..model import DeltaModel

Tokenizer = Callable[[list[str]], Tensor]

OPENAI_TEMPLATES = ("a photo of a {}.",)
"""The single template CoOp and CoCoOp compare against (CLIP's ImageNet recipe averages 80)."""


def is_text_site(site: Any) -> bool:
    """Whether a site lies in a CLIP's text tower (its map's ``text`` tower, or any module
    of the model that is not under ``visual``)."""
    tower = getattr(site, "tower", None)
    if tower is not None:
        return tower == "text"
    path = getattr(site, "path", "") or ""
    return not (path == "visual" or path.startswith("visual.") or path.startswith("visual["))


class ClipHead(nn.Module):
    """A CLIP classifier over fixed class names. Build it with :func:`zero_shot_head`.

    ``forward(images) -> (B, C)`` logits. The model is a submodule (``head.model``), so
    ``head.eval()``, ``head.to(...)`` and ``head.parameters()`` reach it; the head itself
    holds no trainable parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        classnames: Sequence[str],
        templates: Sequence[str] = OPENAI_TEMPLATES,
        tokenizer: Tokenizer | None = None,
        learned_template: str = "{}.",
    ) -> None:
        super().__init__()
        classnames = [str(c) for c in classnames]
        templates = [str(t) for t in templates]
        if not classnames:
            raise ValueError("classnames is empty; give at least one class name")
        if not templates or any("{}" not in t for t in [*templates, learned_template]):
            raise ValueError(
                f"every template needs a '{{}}' where the class name goes; got {templates} "
                f"and learned_template={learned_template!r}"
            )
        for attr in ("encode_image", "encode_text", "logit_scale"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"the CLIP head needs an open_clip CLIP (or a unipeft DeltaModel wrapping "
                    f"one): {type(model).__name__} has no {attr!r}"
                )
        self.model = model
        self.classnames = classnames
        self.templates = templates
        self.learned_template = learned_template
        self.tokenizer = tokenizer if tokenizer is not None else default_tokenizer(model)
        prompts = [t.format(c) for c in classnames for t in templates]
        self.register_buffer("template_ids", self._tokenize(prompts), persistent=False)
        learned = [learned_template.format(c) for c in classnames]
        self.register_buffer("class_ids", self._tokenize(learned), persistent=False)
        self._cache: tuple[Any, Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def _tokenize(self, texts: list[str]) -> Tensor:
        ids = self.tokenizer(texts)
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[0] != len(texts):
            raise TypeError(
                "the tokenizer must return a LongTensor (N, context_length) for N texts; got "
                f"{type(ids).__name__} {tuple(getattr(ids, 'shape', ()))}"
            )
        vocab = getattr(self.model, "vocab_size", None)
        if isinstance(vocab, int) and int(ids.max()) >= vocab:
            raise ValueError(
                f"the tokenizer gives ids up to {int(ids.max())} but the model's vocabulary "
                f"has {vocab} tokens; pass a tokenizer for this model (for a small model "
                f"trained from scratch, unipeft.clip.WordTokenizer({vocab}, context_length))"
            )
        return ids.long()

    # ------------------------------------------------------------------ adapters
    def _text_deltas(self) -> list[tuple[str, Any, nn.Module]]:
        """``(adapter, site, delta)`` of every active adapter's text-tower delta."""
        model = self.model
        if not isinstance(model, DeltaModel):
            return []
        out = []
        adapters = model.adapters
        for name in model.active_adapters:
            for att in adapters[name].attachments:
                if is_text_site(att.site):
                    out.append((name, att.site, att.delta))
        return out

    def _context_delta(self) -> Any | None:
        found = [d for _, _, d in self._text_deltas() if isinstance(d, TextConditioned)]
        if len(found) > 1:
            raise ValueError(
                "more than one active adapter learns the prompt context (coop/cocoop); "
                "they would overwrite the same positions: activate one of them "
                "(model.set_active(name))"
            )
        return found[0] if found else None

    def _text_state(self) -> tuple[Any, list[Tensor]]:
        """A key that changes whenever the text features can, and the text-side tensors."""
        model = self.model
        if not isinstance(model, DeltaModel):
            return None, []
        tensors: list[Tensor] = []
        with_text = set()
        for name, _, delta in self._text_deltas():
            tensors.extend(delta.parameters())
            tensors.extend(delta.buffers())
            with_text.add(name)
        for name in sorted(with_text):
            shared = model.adapters[name].shared
            if shared is not None:
                tensors.extend(shared.parameters())
                tensors.extend(shared.buffers())
        key = (
            model.active_adapters,
            tuple(model.merged_adapters),
            tuple((id(t), t._version, t.requires_grad) for t in tensors),
        )
        return key, tensors

    # ------------------------------------------------------------------ features
    def image_features(self, images: Tensor) -> Tensor:
        """``(B, d)`` normalised image features (through the image tower's adapters)."""
        return F.normalize(self.model.encode_image(images), dim=-1)

    def _encode(self, ids: Tensor, delta: Any, **condition: Tensor) -> Tensor:
        if delta is None:
            return self.model.encode_text(ids)
        delta.condition(**condition)
        try:
            return self.model.encode_text(ids)
        finally:
            delta.condition()

    def context_ids(self, num_context: int) -> Tensor:
        """The class texts (``learned_template``) with ``num_context`` placeholder tokens
        after SOT (copies of the SOT id, whose embeddings the context replaces)."""
        ids = self.class_ids
        if num_context == 0:
            return ids
        length = ids.shape[1]
        lost = ids[:, length - num_context :]
        if bool((lost != 0).any()):
            bad = self.classnames[int((lost != 0).any(dim=1).nonzero()[0])]
            raise ValueError(
                f"the prompt of class {bad!r} is too long for {num_context} context tokens "
                f"in a context length of {length}: shorten the class name or use fewer "
                "context vectors (n_ctx)"
            )
        fill = ids[:, :1].expand(-1, num_context)
        return torch.cat([ids[:, :1], fill, ids[:, 1 : length - num_context]], dim=1)

    def text_features(self) -> Tensor:
        """``(C, d)`` normalised class text features. Cached while nothing they depend on
        changes (see the module docstring); recomputed with gradients while text-side
        delta parameters train. Not available with CoCoOp (its texts depend on the image)."""
        delta = self._context_delta()
        if delta is not None and getattr(delta, "image_conditioned", False):
            raise ValueError(
                "the active adapter conditions the text on the image (cocoop): class text "
                "features exist per image; call the head on images instead"
            )
        key, tensors = self._text_state()
        trains = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if not trains and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        if delta is not None:
            ids = self.context_ids(delta.num_context)
            classes = torch.arange(self.num_classes, device=ids.device)
            feats = F.normalize(self._encode(ids, delta, classes=classes), dim=-1)
        else:
            feats = F.normalize(self.model.encode_text(self.template_ids), dim=-1)
            feats = feats.view(self.num_classes, len(self.templates), -1).mean(dim=1)
            feats = F.normalize(feats, dim=-1)
        if not trains:
            feats = feats.detach()
            self._cache = (key, feats)
        return feats

    def refresh(self) -> None:
        """Forget the cached text features (needed only after changing what the cache key
        cannot see, such as backbone weights edited in place or ``model.disable()``)."""
        self._cache = None

    def forward(self, images: Tensor) -> Tensor:
        img = self.image_features(images)
        scale = self.model.logit_scale.exp()
        delta = self._context_delta()
        if delta is not None and getattr(delta, "image_conditioned", False):
            b, c = img.shape[0], self.num_classes
            ids = self.context_ids(delta.num_context).repeat(b, 1)
            classes = torch.arange(c, device=ids.device).repeat(b)
            txt = self._encode(ids, delta, classes=classes, image_features=img)
            txt = F.normalize(txt, dim=-1).view(b, c, -1)
            logits = scale * torch.einsum("bd,bcd->bc", img, txt.to(img.dtype))
        else:
            logits = scale * img @ self.text_features().to(img.dtype).T
        bias = getattr(self.model, "logit_bias", None)
        return logits if bias is None else logits + bias


def default_tokenizer(model: nn.Module) -> Tokenizer:
    """open_clip's BPE tokenizer (its vocabulary ships in the wheel) at the model's context
    length."""
    import open_clip

    length = int(getattr(model, "context_length", 77))

    def tokenize(texts: list[str]) -> Tensor:
        return open_clip.tokenize(texts, context_length=length)

    return tokenize


def zero_shot_head(
    model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[str] = OPENAI_TEMPLATES,
    tokenizer: Tokenizer | None = None,
    learned_template: str = "{}.",
) -> ClipHead:
    """A :class:`ClipHead` classifying among ``classnames``.

    ``model``: an open_clip CLIP or a unipeft DeltaModel wrapping one. ``templates``: the
    zero-shot prompts (``"{}"`` is the class name), averaged per class. ``tokenizer``: any
    callable ``list[str] -> LongTensor (N, L)``; default open_clip's own at the model's
    context length. ``learned_template``: the text used while a learned-context adapter
    (coop, cocoop) is active, whose context replaces the template's words.
    """
    return ClipHead(model, classnames, templates, tokenizer, learned_template)


def init_context(
    model: DeltaModel,
    phrase: str,
    tokenizer: Tokenizer | None = None,
    adapter: str | None = None,
) -> None:
    """Start CoOp/CoCoOp context vectors from a phrase's word embeddings (the papers'
    ``ctx_init``, e.g. ``"a photo of a"``): with it, CoOp starts exactly as the zero-shot
    prompt ``"a photo of a {class}."``. The phrase must have as many tokens as the
    adapter's ``n_ctx``. ``adapter``: default the first active adapter."""
    if not isinstance(model, DeltaModel):
        raise TypeError("init_context needs the unipeft DeltaModel that holds the adapter")
    name = adapter or (model.active_adapters[0] if model.active_adapters else None)
    if name is None:
        raise ValueError("no active adapter; name the adapter to initialise")
    atts = [a for a in model.get_adapter(name).attachments if isinstance(a.delta, TextConditioned)]
    if not atts:
        raise ValueError(f"adapter {name!r} has no learned context (coop or cocoop)")
    tokenize = tokenizer if tokenizer is not None else default_tokenizer(model)
    ids = tokenize([phrase])[0]
    words = ids[1 : int(ids.argmax())]
    for att in atts:
        delta, embedding = att.delta, att.site.module
        if len(words) != delta.num_context:
            raise ValueError(
                f"{phrase!r} has {len(words)} tokens but adapter {name!r} learns "
                f"{delta.num_context} context vectors (n_ctx); give a phrase of "
                f"{delta.num_context} tokens or an adapter with n_ctx={len(words)}"
            )
        with torch.no_grad():
            delta.set_context(F.embedding(words.to(embedding.weight.device), embedding.weight))
