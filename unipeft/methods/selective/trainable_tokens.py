"""Trainable tokens: new values for a few rows of a token-embedding table.

Only the embedding rows of the chosen ``token_indices`` are trained; every other row stays
frozen. The delta holds the selected rows themselves (not a change of them), ``values``
``(n, d)``, and its output is the embedding's output with the rows of those tokens replaced:

    y'[p] = values[j]   where the input id x[p] == token_indices[j]
    y'[p] = y[p]        for every other id

``values`` starts as a copy of the embedding's own rows (``init_weights=True``), so the
adapter starts as the identity; ``init_weights=False`` draws them from a standard normal, as
PEFT does. ``merged`` writes the rows into the table (``W[token_indices] = values``), but the
method is registered ``mergeable=False`` for now: ``ModuleSite.merge_refusal`` refuses
embedding modules (neither a projection nor a norm), so ``merge()`` could not run. The
rows of the ids are found with a sorted search over ``token_indices`` (no table of the
vocabulary's size). Nothing is shared between sites. Two adapters active at one site with
overlapping indices: the later one's rows win (PEFT refuses the overlap).

Paper: none of its own; it is Hugging Face PEFT's ``TrainableTokens`` (PEFT 0.15+,
https://huggingface.co/docs/peft/package_reference/trainable_tokens), the sparse form of
training the embedding matrix for new or changed tokens.

PEFT equivalent: ``peft_type="TRAINABLE_TOKENS"``; ``token_indices`` -> ``token_indices``,
``init_weights`` -> ``init_weights``; its tensor ``trainable_tokens_delta`` ``(n, d)`` (the
rows themselves, despite the name) is ``values``.

Sites: a token-embedding module, ``nn.Embedding`` (or a subclass that keeps its forward),
called with token ids: role ``embed`` on the text backbones (BERT, GPT-2, Llama) and
``text/embed`` on open_clip. Refused, naming the module: every other site, vision patch
embeddings (convolutions that take pixels, not ids) in particular; embeddings that scale or
change their output (a subclass with its own forward, ``max_norm``). Tied weights: PEFT also
replaces the rows of an output layer tied to the embedding (an LM head); unipeft's site sees
only the embedding, so on a model whose LM head shares the table, the adapter changes the
input embedding only. Use it on the base model (``BertModel``, ``LlamaModel``...) or untie.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import SelectiveDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site

MAX_TOKENS = 1_000_000

# the names text models give their token-embedding module, as module-name regexes
EMBEDDING_NAMES = r"(.*\.)?(word_embeddings|wte|embed_tokens|token_embedding|embed_in)"


class TrainableTokensConfig(DeltaConfig):
    """Which token rows to train, and how they start."""

    token_indices: str = Field(
        "[0-63]",
        description="ids of the tokens whose embedding rows are trained, distinct and "
        "non-negative: a list of ints, one int, or a bracketed text such as '[5,17,42]' or "
        "'[0-63]' (a range, both ends included); kept as that text, consecutive ids written "
        "as ranges. The default '[0-63]' only makes a runnable example: set the ids you need",
    )
    init_weights: bool = Field(
        True,
        description="start each trained row as the embedding's own row (the identity); "
        "False: draw them from a standard normal, as PEFT's init_weights=False",
    )

    @field_validator("token_indices", mode="before")
    @classmethod
    def _canonical(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("token ids must be integers, got a bool")
        if isinstance(value, int):
            value = [value]
        if isinstance(value, list | tuple):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError(f"token ids must be integers, got {value!r}")
            ids = list(value)
        elif isinstance(value, str):
            ids = _parse_ids(value)
        else:
            return value  # strict validation names the wrong type
        if not ids:
            raise ValueError("name at least one token id")
        if len(ids) > MAX_TOKENS:
            raise ValueError(f"at most {MAX_TOKENS} token ids, got {len(ids)}")
        if min(ids) < 0:
            raise ValueError(f"token ids must be >= 0, got {min(ids)}")
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ValueError(f"token ids must be distinct; repeated: {dup}")
        return _format_ids(ids)

    @property
    def indices(self) -> tuple[int, ...]:
        """``token_indices`` as integers, in the given order."""
        return tuple(_parse_ids(self.token_indices))


def _parse_ids(text: str) -> list[int]:
    """``'[5,17 20-22]'`` -> ``[5, 17, 20, 21, 22]``."""
    body = text.strip()
    if not (body.startswith("[") and body.endswith("]")):
        raise ValueError(
            f"{text!r} is not a bracketed list of non-negative token ids such as '[5,17,42]' "
            "or '[0-63]' (or pass a list of ints)"
        )
    ids: list[int] = []
    for part in body[1:-1].replace(",", " ").split():
        lo, dash, hi = part.partition("-")
        ends = (lo, hi) if dash else (lo,)
        if not all(e.isascii() and e.isdigit() for e in ends):
            raise ValueError(
                f"{text!r} is not a bracketed list of non-negative token ids such as "
                "'[5,17,42]' or '[0-63]'"
            )
        a, b = int(ends[0]), int(ends[-1])
        if b < a:
            raise ValueError(f"range {part!r} ends below its start")
        if len(ids) + b - a + 1 > MAX_TOKENS:
            raise ValueError(f"at most {MAX_TOKENS} token ids")
        ids.extend(range(a, b + 1))
    return ids


def _format_ids(ids: list[int]) -> str:
    """``[5, 17, 20, 21, 22]`` -> ``'[5,17,20-22]'`` (the order kept)."""
    out: list[str] = []
    start = prev = ids[0]
    for i in [*ids[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return "[" + ",".join(out) + "]"


class TrainableTokensDelta(SelectiveDelta):
    """The embedding's output with the rows of ``indices`` replaced by ``values`` ``(n, d)``.

    :class:`SelectiveDelta` tunes a bias or a projection's weight; this class keeps rows of
    an embedding table and overrides ``forward``, ``dense`` and ``merged``. The sorted ids
    and their order are non-persistent buffers rebuilt from the config.
    """

    def __init__(self, site: ModuleSite, indices: tuple[int, ...], init_weights: bool) -> None:
        weight, _ = site.weight_views()
        super().__init__("bias", (len(indices), weight.shape[1]))
        self.site = site  # plain attribute: nothing of it is saved
        self.indices = indices
        ids = torch.tensor(indices, dtype=torch.long, device=weight.device)
        order = torch.argsort(ids)
        self.register_buffer("sorted_ids", ids[order], persistent=False)
        self.register_buffer("order", order, persistent=False)
        with torch.no_grad():
            if init_weights:
                self.values.copy_(weight[ids].float())
            else:
                self.values.normal_()

    def rows(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(hit, j)`` for token ids ``ids``: whether each id is trained, and its row."""
        pos = torch.searchsorted(self.sorted_ids, ids).clamp_(max=len(self.indices) - 1)
        return self.sorted_ids[pos] == ids, self.order[pos]

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        if x is None:
            raise RuntimeError("trainable_tokens needs the embedding's input ids")
        hit, j = self.rows(x)
        return torch.where(hit.unsqueeze(-1), self.values[j].to(y.dtype), y)

    def dense(self) -> Tensor:
        """The change of the whole table ``(vocab, d)``: the new rows minus the site's own,
        zero elsewhere."""
        weight, _ = self.site.weight_views()
        ids = torch.tensor(self.indices, dtype=torch.long, device=weight.device)
        out = torch.zeros(weight.shape, dtype=self.values.dtype, device=weight.device)
        return out.index_copy(0, ids, self.values - weight[ids].to(self.values.dtype))

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The table with the trained rows written in (``W[token_indices] = values``)."""
        ids = torch.tensor(self.indices, dtype=torch.long, device=weight.device)
        return weight.index_copy(0, ids, self.values.detach().to(weight.dtype)), bias


def embedding_refusal(site: Site) -> str | None:
    """Why ``site`` is not a token-embedding table looked up by ids (None when it is)."""
    if not isinstance(site, ModuleSite):
        return f"{site.name!r} is a token sequence, not an embedding module"
    module = site.module
    kind = type(module).__name__
    hint = (
        "trainable_tokens replaces rows of a token-embedding table (nn.Embedding) looked up "
        "by token ids; target a text model's token embedding (role 'embed' on BERT, GPT-2 "
        "or Llama, 'text/embed' on open_clip)"
    )
    if site.entry is not None or site.out_slice is not None:
        return f"site {site.name!r} is a path or a slice, not an embedding module; {hint}"
    if not isinstance(module, nn.Embedding):
        what = "a convolution that takes pixels, not ids" if site.weight is not None else kind
        return f"site {site.name!r} ({kind}) is {what}; {hint}"
    if type(module).forward is not nn.Embedding.forward:
        return (
            f"site {site.name!r} ({kind}) is an embedding with its own forward (it may scale "
            "or change the rows it looks up), whose output rows cannot be replaced exactly"
        )
    if module.max_norm is not None:
        return (
            f"site {site.name!r} renormalises the rows it looks up (max_norm="
            f"{module.max_norm}), so a replaced row would not be the trained one"
        )
    return None


def _accepts(cfg: TrainableTokensConfig, site: Site) -> str | None:
    return embedding_refusal(site)


def _size_check(cfg: TrainableTokensConfig, site: Site) -> str | None:
    if not isinstance(site, ModuleSite) or not isinstance(site.module, nn.Embedding):
        return None
    vocab = site.module.num_embeddings
    too_big = [i for i in cfg.indices if i >= vocab]
    if too_big:
        return (
            f"token_indices: {too_big[:5]} are not below the vocabulary size {vocab} of "
            f"{site.name!r} (ids must be < {vocab})"
        )
    return None


def _build(cfg: TrainableTokensConfig, site: Site) -> TrainableTokensDelta:
    assert isinstance(site, ModuleSite)
    return TrainableTokensDelta(site, cfg.indices, cfg.init_weights)


def _count(cfg: TrainableTokensConfig, site: Site) -> int:
    assert isinstance(site, ModuleSite)
    return len(cfg.indices) * site.module.weight.shape[1]


def _identity(cfg: TrainableTokensConfig) -> bool:
    return cfg.init_weights


METHOD = Method(
    id="trainable_tokens",
    family="selective",
    config=TrainableTokensConfig,
    build=_build,
    num_parameters=_count,
    formula="n · d per token embedding (n: number of token_indices, d: embedding width)",
    site_kinds=("module",),
    default_targets=(f"re:{EMBEDDING_NAMES}?",),
    # the rows are a fixed weight change, but unipeft's ModuleSite.merge_refusal refuses
    # embedding modules today; merged() is written and tested directly
    mergeable=False,
    identity_at_init=_identity,
    paper="Hugging Face PEFT, TrainableTokens (PEFT 0.15, 2025), "
    "https://huggingface.co/docs/peft/package_reference/trainable_tokens",
    summary="trains only the embedding rows of chosen token ids (new or changed tokens)",
    accepts=_accepts,
    size_check=_size_check,
    refuses="every site but a token-embedding nn.Embedding called with ids (vision patch "
    "embeddings, projections, scaled embeddings); ids not below the vocabulary size",
    budget_field=None,
)
