"""The attention host: prefix keys and values in a vision tower's self-attention.

A delta that implements :meth:`~unipeft.DeltaModule.prefix` at an ``attn`` site is run
here, not on the sublayer's output. While such a delta is attached, the attention module's
forward is an equivalent implementation (an instance attribute, deleted with the last
attachment) that calls the module's own projections as modules (so deltas hosted on them
still run), prepends the running adapters' prefixes to the keys and values, and attends.
Supported: timm's ``Attention`` (fused ``qkv``, optional q/k norms, output norm and gate)
and Hugging Face ViT-style self-attention (``q_proj``/``k_proj``/``v_proj``[/``o_proj``]
as ViT, or ``query``/``key``/``value`` as VideoMAE). ``nn.MultiheadAttention`` takes its
prefixes in :class:`~unipeft.runtime.mha_host.MHAHost`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract.deltas import provides_prefix
from ..contract.sites import ModuleSite
from .state import AdapterState, Attachment


def attention_of(site: ModuleSite) -> nn.Module:
    """The module computing the attention behind an ``attn`` site."""
    return site.entry if site.entry is not None else site.module


def running_prefix(
    state: AdapterState, atts: list[Attachment], batch: int, where: str
) -> tuple[Tensor, Tensor] | None:
    """The running attachments' prefixes concatenated, ``(N, P, D)`` each, or None."""
    if state.routing is not None:
        if any(state.runs(a.adapter) for a in atts):
            raise ValueError(
                "mixed batches with soft prompts or prefixes are not supported: a prefix "
                f"adapter's keys and values at {where!r} would be seen by every sample. Run "
                "these adapters in separate batches."
            )
        return None
    running = [a for a in state.running(atts) if not a.merged]
    if not running:
        return None
    pairs = [a.delta.prefix(batch) for a in running]
    return torch.cat([k for k, _ in pairs], dim=1), torch.cat([v for _, v in pairs], dim=1)


class AttentionHost:
    """Runs the prefix deltas of one timm or Hugging Face vision self-attention."""

    def __init__(self, module: nn.Module, state: AdapterState) -> None:
        self.module = module
        self.state = state
        self.attachments: list[Attachment] = []
        children = dict(module.named_children())
        if {"qkv", "proj"} <= set(children):
            self.style = "timm"
        elif {"q_proj", "k_proj", "v_proj"} <= set(children):
            self.style = "hf"
            self.names = ("q_proj", "k_proj", "v_proj")
        elif {"query", "key", "value"} <= set(children):
            self.style = "hf"
            self.names = ("query", "key", "value")
        else:
            raise NotImplementedError(
                f"unipeft cannot add prefixes to a {type(module).__name__}: supported are timm "
                "Attention, Hugging Face ViT-style self-attention and nn.MultiheadAttention"
            )

    # --------------------------------------------------------------- kind (see hosts.py)
    @staticmethod
    def claims(site: Any) -> bool:
        return isinstance(site, ModuleSite) and site.role == "attn"

    @staticmethod
    def anchor(site: ModuleSite) -> nn.Module:
        return attention_of(site)

    @classmethod
    def create(cls, site: ModuleSite, state: AdapterState) -> AttentionHost:
        return cls(attention_of(site), state)

    # --------------------------------------------------------------- bookkeeping
    def add(self, att: Attachment, table: Any = None) -> None:
        if not provides_prefix(att.delta):  # pragma: no cover - hosts.py routes only these
            raise TypeError(f"{type(att.delta).__name__} provides no prefix")
        if not self.attachments:
            if "forward" in self.module.__dict__:
                raise RuntimeError(
                    f"the forward of {type(self.module).__name__} is already overridden; "
                    "unipeft cannot add prefixes to it"
                )
            self.module.forward = self._forward
        self.attachments.append(att)

    def remove(self, att: Attachment, table: Any = None) -> None:
        self.attachments.remove(att)
        if not self.attachments and self.module.__dict__.get("forward") == self._forward:
            del self.module.forward

    @property
    def empty(self) -> bool:
        return not self.attachments

    # --------------------------------------------------------------- forward
    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        m = self.module
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        assert isinstance(x, Tensor)
        prefix = running_prefix(self.state, self.attachments, x.shape[0], type(m).__name__)
        if prefix is None:
            return type(m).forward(m, *args, **kwargs)
        if self.style == "timm":
            return self._timm(x, prefix, *args[1:], **kwargs)
        return self._hf(x, prefix, *args[1:], **kwargs)

    def _timm(
        self,
        x: Tensor,
        prefix: tuple[Tensor, Tensor],
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        **_: Any,
    ) -> Tensor:
        m = self.module
        b, n, _c = x.shape
        heads, hd = m.num_heads, m.head_dim
        gate = m.gate(x).sigmoid() if getattr(m, "gate", None) is not None else None
        qkv = m.qkv(x).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = m.q_norm(q), m.k_norm(k)
        pk, pv = (t.to(q.dtype).unflatten(-1, (heads, hd)).transpose(1, 2) for t in prefix)
        k = torch.cat([pk, k], dim=2)  # learned keys: no k_norm
        v = torch.cat([pv, v], dim=2)
        mask = _prefixed_mask(attn_mask, is_causal, n, pk.shape[2], q)
        drop = m.attn_drop.p if m.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        out = out.transpose(1, 2).reshape(b, n, heads * hd)
        out = m.norm(out)
        if gate is not None:
            out = out * gate
        return m.proj_drop(m.proj(out))

    def _hf(
        self,
        x: Tensor,
        prefix: tuple[Tensor, Tensor],
        attention_mask: Tensor | None = None,
        **_: Any,
    ) -> tuple[Tensor, None]:
        m = self.module
        hd = int(getattr(m, "head_dim", 0) or m.attention_head_size)
        qp, kp, vp = (getattr(m, name) for name in self.names)
        b, n = x.shape[:2]
        q, k, v = (p(x).unflatten(-1, (-1, hd)).transpose(1, 2) for p in (qp, kp, vp))
        pk, pv = (t.to(q.dtype).unflatten(-1, (-1, hd)).transpose(1, 2) for t in prefix)
        k = torch.cat([pk, k], dim=2)
        v = torch.cat([pv, v], dim=2)
        mask = _prefixed_mask(attention_mask, False, n, pk.shape[2], q)
        p = getattr(m, "attention_dropout", getattr(m, "dropout_prob", 0.0))
        scale = getattr(m, "scaling", None)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p if m.training else 0.0, scale=scale
        )
        out = out.transpose(1, 2).reshape(b, n, -1)
        o_proj = getattr(m, "o_proj", None)
        if o_proj is not None:
            out = o_proj(out)
        return out, None


def _prefixed_mask(
    mask: Tensor | None, is_causal: bool, n: int, p: int, q: Tensor
) -> Tensor | None:
    """The attention mask over ``[prefix; keys]``: prefix positions are visible to every
    query; a given mask (boolean: True attends; float: added) or causality applies to the
    real keys."""
    if mask is None and not is_causal:
        return None
    if mask is None:
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    if mask.dtype == torch.bool:
        pad = mask.new_ones((*mask.shape[:-1], p))
    else:
        mask = mask.to(q.dtype)
        pad = mask.new_zeros((*mask.shape[:-1], p))
    return torch.cat([pad, mask], dim=-1)
