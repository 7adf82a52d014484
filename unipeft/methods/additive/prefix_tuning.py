"""Prefix tuning: learned keys and values prepended in every attention layer (Li & Liang,
2021).

Each attention layer ``l`` attends over ``[P_k^l; K]`` and ``[P_v^l; V]``, where ``P_k^l``
and ``P_v^l`` are ``P`` learned vectors of the width of the layer's keys (all heads; on
grouped-query models, the key/value heads only). The real tokens' queries, keys and values
are untouched, and the backbone's outputs keep their shapes. With ``prefix_projection``
the prefixes are reparameterised as in the paper: ``MLP(E)`` with ``E`` a ``(P, D)``
embedding and the MLP ``Linear(D, H) -> tanh -> Linear(H, W)``, ``W`` the total width of
every prefix of the adapter; that embedding and MLP are the adapter's **shared module**
(one per adapter, every site takes its columns of the output).

Where it attaches:

- **Hugging Face text models** (BERT, GPT-2, Llama...): the ``tokens`` site of the model,
  one delta for all its layers, as PEFT does it: the prefixes enter as a key/value cache of
  length ``P`` (``past_key_values``), the attention mask gains ``P`` visible columns, and,
  as with any cache, the real tokens' positions start at ``P`` (absolute position tables
  and rotary embeddings alike). ``attn`` sites of these models are refused (target
  ``tokens``).
- **Vision towers**: every ``attn`` site of a timm ``Attention``, a Hugging Face ViT /
  VideoMAE self-attention, and ``nn.MultiheadAttention`` (both open_clip towers; the text
  tower's causal mask keeps the prefix visible to every position). Its ``tokens`` site is
  refused (target ``attn``).

PEFT equivalent: ``PREFIX_TUNING`` (``num_virtual_tokens`` = ``num_tokens``,
``prefix_projection`` and ``encoder_hidden_size`` as here). PEFT saves the computed prefix
``(P, L·2·D)`` even when it trained the MLP, so an adapter read from PEFT has
``prefix_projection=False``; exporting writes the computed prefix the same way.

Not the identity at init (``P`` random keys take attention mass). Not mergeable. Mixed
batches (``adapter_names``) with a prefix adapter are refused.
"""

from __future__ import annotations

import inspect

import torch
from pydantic import Field
from torch import Tensor, nn

from ...contract.config import DeltaConfig
from ...contract.deltas import AdditiveDelta
from ...contract.method import Method
from ...contract.sites import ModuleSite, SequenceSite, Site


class PrefixTuningConfig(DeltaConfig):
    num_tokens: int = Field(
        20, ge=1, le=1024, description="prefix length P: keys and values added per layer"
    )
    prefix_projection: bool = Field(
        False,
        description="reparameterise the prefixes through a shared MLP "
        "(Embedding(P, D) -> Linear(D, H) -> tanh -> Linear(H, total width))",
    )
    encoder_hidden_size: int | None = Field(
        None, ge=1, le=65536, description="H, the MLP's hidden width (None: D, the key width)"
    )
    init_std: float = Field(
        1.0,
        gt=0,
        le=10,
        description="std of the normal init of the prefixes (or the MLP's embedding); PEFT's "
        "nn.Embedding default is 1",
    )


# ----------------------------------------------------------------------------- geometry


def text_geometry(site: SequenceSite) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a Hugging Face text model's attention, from its
    config, as PEFT reads them (grouped-query models: the key/value heads)."""
    config = getattr(site.insert, "config", None)
    if config is None:
        raise TypeError(f"{site.name!r}: the model has no config to read its layers from")
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head", "num_heads")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return int(layers), int(kv_heads), int(head_dim)


def _first(config: object, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise TypeError(f"the model's config has none of {names}")


def attention_module(site: ModuleSite) -> nn.Module:
    """The module that computes a layer's attention, behind an ``attn`` site."""
    return site.entry if site.entry is not None else site.module


def _is_hf_text_attention(module: nn.Module) -> bool:
    params = inspect.signature(type(module).forward).parameters
    return any(p in params for p in ("cache", "past_key_values", "past_key_value", "layer_past"))


def vision_attention_refusal(site: ModuleSite) -> str | None:
    """Why an ``attn`` site cannot take a prefix, or None (timm ``Attention``, a Hugging Face
    ViT / VideoMAE self-attention, ``nn.MultiheadAttention``)."""
    if site.role != "attn":
        return (
            f"{site.name!r} is a {site.role or 'module'} site; prefixes attach to whole "
            "attention sublayers: target 'attn' (or 'tokens' on Hugging Face text models)"
        )
    attn = attention_module(site)
    if isinstance(attn, nn.MultiheadAttention):
        if attn.bias_k is not None or attn.add_zero_attn or not attn._qkv_same_embed_dim:
            return f"{site.name!r}: nn.MultiheadAttention with add_bias_kv / add_zero_attn"
        return None
    if _is_hf_text_attention(attn):
        return (
            f"{site.name!r} is a Hugging Face text model's attention, which takes prefixes "
            "through its key/value cache: target 'tokens' instead"
        )
    children = dict(attn.named_children())
    if {"qkv", "proj"} <= set(children) and hasattr(attn, "num_heads"):
        return None
    hf = {"q_proj", "k_proj", "v_proj"} <= set(children) or {"query", "key", "value"} <= set(
        children
    )
    if hf and hasattr(attn, "config"):
        return None
    return (
        f"{site.name!r}: unipeft adds prefixes to timm Attention, Hugging Face ViT-style "
        f"self-attention and nn.MultiheadAttention, not {type(attn).__name__}"
    )


def site_width(site: Site) -> int:
    """Columns of the flat prefix at ``site``: ``L·2·D_kv`` for a text model, ``2·D``."""
    if isinstance(site, SequenceSite):
        layers, kv_heads, head_dim = text_geometry(site)
        return layers * 2 * kv_heads * head_dim
    return 2 * site.features


def key_width(site: Site) -> int:
    if isinstance(site, SequenceSite):
        _, kv_heads, head_dim = text_geometry(site)
        return kv_heads * head_dim
    return site.features


# ----------------------------------------------------------------------------- modules


class PrefixEncoder(nn.Module):
    """The adapter's shared reparameterisation: ``MLP(E)``, ``(P, W)`` with ``W`` the sum
    of every site's width; a site reads its columns (:meth:`columns`)."""

    def __init__(self, cfg: PrefixTuningConfig, sites: tuple[Site, ...]) -> None:
        super().__init__()
        self.spans: dict[str, tuple[int, int]] = {}
        total = 0
        for site in sites:
            width = site_width(site)
            self.spans[site.name] = (total, width)
            total += width
        dim = max((key_width(s) for s in sites), default=1)
        hidden = cfg.encoder_hidden_size or dim
        self.embedding = nn.Parameter(torch.randn(cfg.num_tokens, dim) * cfg.init_std)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, total))

    def forward(self) -> Tensor:
        return self.mlp(self.embedding)

    def columns(self, name: str) -> Tensor:
        start, width = self.spans[name]
        return self.forward()[:, start : start + width]


class _Unused(nn.Module):
    """The shared module of an adapter without ``prefix_projection``: holds nothing."""


def encoder_parameters(cfg: PrefixTuningConfig, sites: tuple[Site, ...]) -> int:
    if not cfg.prefix_projection:
        return 0
    dim = max((key_width(s) for s in sites), default=1)
    hidden = cfg.encoder_hidden_size or dim
    total = sum(site_width(s) for s in sites)
    return cfg.num_tokens * dim + dim * hidden + hidden + hidden * total + total


class PrefixDelta(AdditiveDelta):
    """The prefix of one attention layer (``layers=None``) or of every layer of a text
    model. The flat prefix is ``(P, n·2·D)``; columns ``[2lD, (2l+1)D)`` are layer ``l``'s
    keys and the next ``D`` its values (PEFT's layout)."""

    def __init__(self, num_tokens: int, width: int, layers: int | None) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.width = width
        self.layers = layers
        self.site_name = ""  # the column span to read from a shared PrefixEncoder
        self.register_parameter("kv", None)

    def own(self, init_std: float) -> None:
        """Give the delta its own flat prefix ``kv``, drawn from ``N(0, init_std)``."""
        n = self.layers or 1
        self.kv = nn.Parameter(torch.randn(self.num_tokens, n * 2 * self.width) * init_std)

    def flat(self) -> Tensor:
        """The flat prefix ``(P, n·2·D)``."""
        if self.kv is not None:
            return self.kv
        encoder = self.shared
        assert isinstance(encoder, PrefixEncoder)
        return encoder.columns(self.site_name)

    def prefix_kv(self) -> tuple[Tensor, Tensor]:
        """``(keys, values)`` without the batch: ``(P, D)``, or ``(L, P, D)`` for a text model."""
        n = self.layers or 1
        f = self.flat().view(self.num_tokens, n, 2, self.width)
        keys, values = f[:, :, 0].transpose(0, 1), f[:, :, 1].transpose(0, 1)
        if self.layers is None:
            return keys[0], values[0]
        return keys, values

    def prefix(self, batch_size: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        keys, values = self.prefix_kv()
        shape = (batch_size, *keys.shape)
        return keys.unsqueeze(0).expand(shape), values.unsqueeze(0).expand(shape)

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        raise TypeError(
            "a prefix delta is run by the attention hosts (prefix()), not as forward(x, y)"
        )


def build_prefix(
    num_tokens: int, init_std: float, site: Site, encoder: nn.Module | None = None
) -> PrefixDelta:
    """A prefix delta for ``site``: its own parameters, or columns of ``encoder`` (a
    :class:`PrefixEncoder`). Hybrids (MAM, UniPELT) build theirs with this."""
    layers = text_geometry(site)[0] if isinstance(site, SequenceSite) else None
    delta = PrefixDelta(num_tokens, key_width(site), layers)
    if isinstance(encoder, PrefixEncoder):
        delta.site_name = site.name
        delta.use_shared(encoder)
    else:
        delta.own(init_std)
    return delta


def prefix_parameters(num_tokens: int, site: Site) -> int:
    """Trainable parameters of a prefix with its own parameters at ``site``."""
    return num_tokens * site_width(site)


def prefix_refusal(site: Site) -> str | None:
    """Why ``site`` cannot take a prefix, or None."""
    if isinstance(site, SequenceSite):
        if not site.attends:
            return (
                f"{site.name!r} is the token sequence of a model without attention layers; "
                "prefix tuning prepends keys and values to attention: use prompt_tuning "
                "(soft tokens in front of the sequence) instead"
            )
        if site.style != "hf_text":
            return (
                f"{site.name!r} is a vision tower's token sequence; prefixes go into every "
                "attention layer there: target 'attn'"
            )
        try:
            text_geometry(site)
        except TypeError as exc:
            return str(exc)
        return None
    return vision_attention_refusal(site)


def prefix_size_refusal(field: str, count: int, site: Site) -> str | None:
    """A text model's position table must leave room for the input after ``count``
    cached positions."""
    if isinstance(site, SequenceSite) and site.max_length is not None and count >= site.max_length:
        return (
            f"{field}={count} prefix positions do not fit: the real tokens' positions start "
            f"after the prefix and {site.name!r}'s position table holds {site.max_length}, "
            f"so {field} must be <= {site.max_length - 1}"
        )
    return None


# ----------------------------------------------------------------------------- the method


def _shared(cfg: PrefixTuningConfig, sites: tuple[Site, ...]) -> nn.Module:
    return PrefixEncoder(cfg, sites) if cfg.prefix_projection else _Unused()


def _build(cfg: PrefixTuningConfig, site: Site, shared: nn.Module) -> PrefixDelta:
    return build_prefix(cfg.num_tokens, cfg.init_std, site, shared)


def _count(cfg: PrefixTuningConfig, site: Site) -> int:
    return 0 if cfg.prefix_projection else prefix_parameters(cfg.num_tokens, site)


def _accepts(cfg: PrefixTuningConfig, site: Site) -> str | None:
    return prefix_refusal(site)


def _fits(cfg: PrefixTuningConfig, site: Site) -> str | None:
    return prefix_size_refusal("num_tokens", cfg.num_tokens, site)


METHOD = Method(
    id="prefix_tuning",
    family="additive",
    config=PrefixTuningConfig,
    build=_build,
    num_parameters=_count,
    formula="P · 2·D per attention layer (text models: P · L·2·D_kv at the tokens site); "
    "with prefix_projection, nothing per site and P·E + E·H + H + (H+1)·W shared "
    "(E: largest key width, W: total prefix width)",
    site_kinds=("module", "sequence"),
    default_targets=("tokens?", "attn?"),
    budget_field="num_tokens",
    mergeable=False,
    identity_at_init=False,
    paper="Li & Liang, Prefix-Tuning: Optimizing Continuous Prompts for Generation, 2021, "
    "arXiv:2101.00190",
    summary="learned keys and values prepended in every attention layer",
    accepts=_accepts,
    size_check=_fits,
    shared=_shared,
    shared_parameters=encoder_parameters,
    refuses="on Hugging Face text models, attn sites (the prefix goes through the KV cache at "
    "the tokens site); on vision towers, the tokens site (target attn); attention modules other "
    "than timm Attention, Hugging Face ViT-style self-attention and nn.MultiheadAttention",
)
