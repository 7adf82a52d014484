"""The ``nn.MultiheadAttention`` host.

It routes ``nn.MultiheadAttention.forward`` through an equivalent implementation that
projects q/k/v with the fused ``in_proj_weight`` once, lets deltas act on each slice, and
calls ``out_proj`` as a module (so its hooks run). Prefix deltas
(:meth:`~unipeft.DeltaModule.prefix`) at the attention's ``attn`` site prepend their keys and
values to the projected ones; every query sees them, under a causal ``attn_mask`` too. The
base weights are never modified on the forward pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract.deltas import provides_prefix
from ..contract.sites import ModuleSite
from .attention_host import running_prefix
from .module_host import ModuleHost
from .state import AdapterState, Attachment


class MHAHost:
    """Routes an ``nn.MultiheadAttention`` through a delta-aware forward while needed."""

    def __init__(self, mha: nn.MultiheadAttention, state: AdapterState) -> None:
        if mha.bias_k is not None or mha.add_zero_attn or not mha._qkv_same_embed_dim:
            raise NotImplementedError(
                "unipeft adapts nn.MultiheadAttention with a fused in_proj_weight and without "
                "add_bias_kv / add_zero_attn; use a module-name target on out_proj instead"
            )
        self.mha = mha
        self.state = state
        self.projections = ModuleHost(mha, state, hook=False)  # on in_proj slices
        self.users: set[int] = set()  # ids of attachments (in_proj or out_proj) needing us
        self.prefixes: list[Attachment] = []  # prefix deltas at the attention's attn site
        self.out_host: ModuleHost | None = None

    # --------------------------------------------------------------- kind (see hosts.py)
    @staticmethod
    def claims(site: Any) -> bool:
        """Every module site inside an ``nn.MultiheadAttention``: its ``in_proj`` slices and
        its ``out_proj`` (whose own host runs it, called from this forward). Prefix deltas
        on the attention itself are routed here by :mod:`~unipeft.runtime.hosts`."""
        return isinstance(site, ModuleSite) and isinstance(site.host, nn.MultiheadAttention)

    @staticmethod
    def anchor(site: ModuleSite) -> nn.Module:
        host = site.host if site.host is not None else site.module
        assert isinstance(host, nn.MultiheadAttention)
        return host

    @classmethod
    def create(cls, site: ModuleSite, state: AdapterState) -> MHAHost:
        return cls(cls.anchor(site), state)  # type: ignore[arg-type]

    # --------------------------------------------------------------- bookkeeping
    def add(self, att: Attachment, table: Any) -> None:
        site = att.site
        assert isinstance(site, ModuleSite)
        if provides_prefix(att.delta):
            self.prefixes.append(att)
        elif site.module is self.mha:
            self.projections.add(att)
        else:  # out_proj: a module host of its own, which this forward calls
            self.out_host = table.open(ModuleHost, site)
            self.out_host.add(att)
        if not self.users:
            self.mha.forward = self._forward  # instance attribute shadows the class method
        self.users.add(id(att))

    def remove(self, att: Attachment, table: Any) -> None:
        site = att.site
        assert isinstance(site, ModuleSite)
        if provides_prefix(att.delta):
            self.prefixes.remove(att)
        elif site.module is self.mha:
            self.projections.remove(att)
        else:
            table.release(ModuleHost, site, att)
        self.users.discard(id(att))
        if not self.users and "forward" in self.mha.__dict__:
            del self.mha.forward

    @property
    def empty(self) -> bool:
        return not self.users

    def _active(self) -> bool:
        if self.projections.running():
            return True
        if any(self.state.runs(a.adapter) for a in self.prefixes):
            return True
        return self.out_host is not None and bool(self.out_host.running())

    def _forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        m = self.mha
        if not self._active():
            return type(m).forward(
                m,
                query,
                key,
                value,
                key_padding_mask,
                need_weights,
                attn_mask,
                average_attn_weights,
                is_causal,
            )
        batched = query.dim() == 3
        if not batched:
            query, key, value = (
                t.unsqueeze(1 if not m.batch_first else 0) for t in (query, key, value)
            )
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not m.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._project(query, key, value)
        n, lq, e = q.shape
        lk = k.shape[1]
        h = m.num_heads
        hd = e // h
        mask = _merge_masks(attn_mask, key_padding_mask, n, h, lq, lk, q.dtype)
        prefix = running_prefix(self.state, self.prefixes, n, "nn.MultiheadAttention")
        p_len = 0
        if prefix is not None:
            p_len = prefix[0].shape[1]
            k = torch.cat([prefix[0].to(k.dtype), k], dim=1)
            v = torch.cat([prefix[1].to(v.dtype), v], dim=1)
            if mask is None and is_causal:
                causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
                mask = torch.zeros(lq, lk, dtype=q.dtype, device=q.device)
                mask = mask.masked_fill(~causal, float("-inf")).view(1, 1, lq, lk)
            if mask is not None:  # the prefix is visible to every query
                mask = torch.cat([mask.new_zeros((*mask.shape[:-1], p_len)), mask], dim=-1)
            is_causal = False
            lk = lk + p_len
        q = q.view(n, lq, h, hd).transpose(1, 2)
        k = k.view(n, lk, h, hd).transpose(1, 2)
        v = v.view(n, lk, h, hd).transpose(1, 2)
        p = m.dropout if m.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / (hd**0.5)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
                scores = scores.masked_fill(~causal, float("-inf"))
            weights = torch.softmax(scores, dim=-1)
            out = F.dropout(weights, p=p, training=m.training) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal and mask is None
            )
        out = out.transpose(1, 2).reshape(n, lq, e)
        out = m.out_proj(out)
        if not m.batch_first:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1 if not m.batch_first else 0)
        if weights is not None:
            weights = weights[..., p_len:]  # the real keys' weights, as the caller expects
            weights = weights.mean(dim=1) if average_attn_weights else weights
            if not batched:
                weights = weights.squeeze(0)
        return out, weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m = self.mha
        w, b = m.in_proj_weight, m.in_proj_bias
        e = m.embed_dim
        running = self.projections.running()
        by_slice: dict[int, list[Attachment]] = {}
        for att in running:
            assert att.site.out_slice is not None
            by_slice.setdefault(att.site.out_slice[0] // e, []).append(att)
        if query is key and key is value:
            qkv = F.linear(query, w, b)
            done = self.projections.try_update_slices(running, query, qkv)
            if done is not None:  # every slice updated inside qkv at once
                q, k, v = done.chunk(3, dim=-1)
                return q, k, v
            parts = list(qkv.chunk(3, dim=-1))
            inputs = (query, query, query)
        else:
            inputs = (query, key, value)
            parts = [
                F.linear(t, w[i * e : (i + 1) * e], None if b is None else b[i * e : (i + 1) * e])
                for i, t in enumerate(inputs)
            ]
        for i, atts in by_slice.items():
            parts[i] = self.projections.run_group(atts, inputs[i], parts[i])
        return parts[0], parts[1], parts[2]


def _merge_masks(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    n: int,
    h: int,
    lq: int,
    lk: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """One additive float mask ``(N, H, Lq, Lk)`` (or broadcastable) from MHA's two masks."""

    def additive(mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                mask, float("-inf")
            )
        return mask.to(dtype)

    out = None
    if attn_mask is not None:
        am = additive(attn_mask)
        am = am.view(1, 1, lq, lk) if am.dim() == 2 else am.view(n, h, lq, lk)
        out = am
    if key_padding_mask is not None:
        kp = additive(key_padding_mask).view(n, 1, 1, lk)
        out = kp if out is None else out + kp
    return out
