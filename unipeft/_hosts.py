"""Hosts: the hooks that run delta modules inside a backbone without changing its modules.

One host per backbone module (per kind) holds every attachment on it, from every adapter,
and installs forward hooks only while it has attachments. The backbone's classes, its
parameters and its state dict are never replaced, so ``unload`` only removes hooks.

- :class:`ModuleHost`: output hooks on a module (slices of fused projections included).
- :class:`MHAHost`: routes ``nn.MultiheadAttention.forward`` through an equivalent
  implementation that projects q/k/v with the fused ``in_proj_weight`` once, lets deltas act
  on each slice, and calls ``out_proj`` as a module (so its hooks run). The base weights are
  never modified on the forward pass.
- :class:`SequenceHost`: inserts soft tokens into a token sequence and strips them again.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .delta import DeltaModule
from .sites import ModuleSite, SequenceSite


@dataclass
class AdapterState:
    """What the hooks read on every forward: which adapters run."""

    active: tuple[str, ...] = ()
    enabled: bool = True

    def runs(self, adapter: str) -> bool:
        return self.enabled and adapter in self.active


@dataclass(eq=False)
class Attachment:
    adapter: str
    site: ModuleSite | SequenceSite
    delta: DeltaModule
    merged: bool = False
    saved: tuple[Tensor, Tensor | None, bool] | None = field(default=None, repr=False)


def first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    if args and isinstance(args[0], Tensor):
        return args[0]
    hs = kwargs.get("hidden_states")
    if isinstance(hs, Tensor):
        return hs
    for value in kwargs.values():
        if isinstance(value, Tensor):
            return value
    return None


def _split_output(output: Any) -> tuple[Tensor | None, Callable[[Tensor], Any]]:
    """The main tensor of a module's output and a function that puts a new one back."""
    if isinstance(output, Tensor):
        return output, lambda t: t
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        rest = output[1:]
        return output[0], lambda t: (t, *rest)
    if hasattr(output, "keys") and hasattr(output, "__getitem__"):  # transformers ModelOutput
        keys = list(output.keys())
        if keys and isinstance(output[keys[0]], Tensor):
            key = keys[0]

            def put(t: Tensor) -> Any:
                output[key] = t
                return output

            return output[key], put
    return None, lambda t: output


class ModuleHost:
    """Runs the active deltas attached to one module on its output."""

    def __init__(self, module: nn.Module, state: AdapterState, *, hook: bool = True) -> None:
        self.module = module
        self.state = state
        self.hook = hook
        self.attachments: list[Attachment] = []
        self._handles: list[RemovableHandle] = []
        self._entry_handles: dict[int, RemovableHandle] = {}
        self._captured: dict[int, Tensor | None] = {}

    # --------------------------------------------------------------- bookkeeping
    def add(self, att: Attachment) -> None:
        self.attachments.append(att)
        if self.hook and not self._handles:
            self._handles.append(self.module.register_forward_hook(self._hook, with_kwargs=True))
        entry = getattr(att.site, "entry", None)
        if entry is not None and id(entry) not in self._entry_handles:
            key = id(entry)

            def capture(mod: nn.Module, args: tuple, kwargs: dict, _key: int = key) -> None:
                self._captured[_key] = first_tensor(args, kwargs)

            self._entry_handles[key] = entry.register_forward_pre_hook(capture, with_kwargs=True)

    def remove(self, att: Attachment) -> None:
        self.attachments.remove(att)
        live_entries = {id(a.site.entry) for a in self.attachments if a.site.entry is not None}
        for key in list(self._entry_handles):
            if key not in live_entries:
                self._entry_handles.pop(key).remove()
                self._captured.pop(key, None)
        if not self.attachments:
            for h in self._handles:
                h.remove()
            self._handles.clear()

    @property
    def empty(self) -> bool:
        return not self.attachments

    def running(self) -> list[Attachment]:
        return [a for a in self.attachments if not a.merged and self.state.runs(a.adapter)]

    # --------------------------------------------------------------- forward
    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        running = self.running()
        if not running:
            return None
        y, put = _split_output(output)
        if y is None:
            raise RuntimeError(
                f"unipeft cannot adapt the output of {type(module).__name__}: it is not a "
                "tensor, a tuple starting with one, or a ModelOutput"
            )
        x = first_tensor(args, kwargs)
        return put(self.apply(running, x, y))

    def apply(self, running: list[Attachment], x: Tensor | None, y: Tensor) -> Tensor:
        """Apply ``running`` deltas to ``y`` (slices first, then whole-output deltas)."""
        sliced: dict[tuple[int, int], list[Attachment]] = {}
        whole: list[Attachment] = []
        for att in running:
            s = att.site.out_slice
            (sliced.setdefault(s, []) if s is not None else whole).append(att)
        if sliced:
            dim = running[0].site.channel_dim
            y = self._apply_slices(sliced, x, y, dim)
        for att in whole:
            y = att.delta(self._input_for(att, x), y)
        return y

    def _apply_slices(
        self, sliced: dict[tuple[int, int], list[Attachment]], x: Tensor | None, y: Tensor, dim: int
    ) -> Tensor:
        pieces: list[Tensor] = []
        pos = 0
        total = y.shape[dim]
        for start, stop in sorted(sliced):
            if start > pos:
                pieces.append(y.narrow(dim, pos, start - pos))
            part = y.narrow(dim, start, stop - start)
            for att in sliced[(start, stop)]:
                part = att.delta(self._input_for(att, x), part)
            pieces.append(part)
            pos = stop
        if pos < total:
            pieces.append(y.narrow(dim, pos, total - pos))
        return torch.cat(pieces, dim=dim)

    def _input_for(self, att: Attachment, x: Tensor | None) -> Tensor | None:
        entry = att.site.entry
        return x if entry is None else self._captured.get(id(entry))


class MHAHost:
    """Routes an ``nn.MultiheadAttention`` through a delta-aware forward while needed."""

    def __init__(self, mha: nn.MultiheadAttention, state: AdapterState) -> None:
        if mha.bias_k is not None or mha.add_zero_attn or not mha._qkv_same_embed_dim:
            raise NotImplementedError(
                "unipeft adapts nn.MultiheadAttention with a fused in_proj_weight and without "
                "add_bias_kv / add_zero_attn; use a module-name target on out_proj instead"
            )
        self.mha = mha
        self.projections = ModuleHost(mha, state, hook=False)  # on in_proj slices
        self.users: set[int] = set()  # ids of attachments (in_proj or out_proj) needing us
        self.out_host: ModuleHost | None = None

    def add_user(self, att: Attachment) -> None:
        if not self.users:
            self.mha.forward = self._forward  # instance attribute shadows the class method
        self.users.add(id(att))

    def remove_user(self, att: Attachment) -> None:
        self.users.discard(id(att))
        if not self.users and "forward" in self.mha.__dict__:
            del self.mha.forward

    @property
    def empty(self) -> bool:
        return not self.users

    def _active(self) -> bool:
        if self.projections.running():
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
        q = q.view(n, lq, h, hd).transpose(1, 2)
        k = k.view(n, lk, h, hd).transpose(1, 2)
        v = v.view(n, lk, h, hd).transpose(1, 2)
        mask = _merge_masks(attn_mask, key_padding_mask, n, h, lq, lk, q.dtype)
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
            parts = list(qkv.chunk(3, dim=-1))
            inputs = (query, query, query)
        else:
            inputs = (query, key, value)
            parts = [
                F.linear(t, w[i * e : (i + 1) * e], None if b is None else b[i * e : (i + 1) * e])
                for i, t in enumerate(inputs)
            ]
        for i, atts in by_slice.items():
            for att in atts:
                parts[i] = att.delta(inputs[i], parts[i])
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


class SequenceHost:
    """Inserts the active adapters' soft tokens into one token sequence and strips them."""

    def __init__(self, site: SequenceSite, state: AdapterState) -> None:
        self.site = site
        self.state = state
        self.attachments: list[Attachment] = []
        self._handles: list[RemovableHandle] = []
        self._inserted: list[int] = []

    @property
    def empty(self) -> bool:
        return not self.attachments

    def add(self, att: Attachment) -> None:
        self.attachments.append(att)
        if not self._handles:
            self._install()

    def remove(self, att: Attachment) -> None:
        self.attachments.remove(att)
        if not self.attachments:
            for h in self._handles:
                h.remove()
            self._handles.clear()

    def prompts(self, batch: int, ref: Tensor) -> Tensor | None:
        chunks = [
            a.delta.tokens(batch).to(ref.dtype)
            for a in self.attachments
            if self.state.runs(a.adapter)
        ]
        return torch.cat(chunks, dim=1) if chunks else None

    # ----------------------------------------------------------------- install
    def _install(self) -> None:
        s = self.site
        if s.style == "container":
            self._handles.append(
                s.insert.register_forward_pre_hook(self._container_pre, with_kwargs=True)
            )
            self._handles.append(s.strip.register_forward_hook(self._strip_out))
        elif s.style == "between":
            self._handles.append(s.insert.register_forward_hook(self._insert_out))
            if s.strip_output:
                self._handles.append(s.strip.register_forward_hook(self._strip_out))
            else:
                self._handles.append(s.strip.register_forward_pre_hook(self._strip_in))
        elif s.style == "hf_text":
            self._handles.append(s.insert.register_forward_pre_hook(self._hf_pre, with_kwargs=True))
            self._handles.append(s.strip.register_forward_hook(self._strip_out))
        else:  # pragma: no cover - validated by SequenceSite's type
            raise ValueError(s.style)

    # ----------------------------------------------------------------- token surgery
    def _insert(self, seq: Tensor, batch_first: bool = True) -> Tensor:
        if not batch_first:
            seq = seq.transpose(0, 1)
        p = self.prompts(seq.shape[0], seq)
        self._inserted.append(0 if p is None else p.shape[1])
        if p is not None:
            i = self.site.index
            seq = torch.cat([seq[:, :i], p, seq[:, i:]], dim=1)
        return seq if batch_first else seq.transpose(0, 1)

    def _strip(self, seq: Tensor, p: int, batch_first: bool = True) -> Tensor:
        if p == 0:
            return seq
        i = self.site.index
        dim = 1 if batch_first else 0
        rest = seq.shape[dim] - i - p
        return torch.cat([seq.narrow(dim, 0, i), seq.narrow(dim, i + p, rest)], dim)

    def _pop(self) -> int:
        return self._inserted.pop() if self._inserted else 0

    def _insert_out(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return self._insert(output)

    def _strip_in(self, module: nn.Module, args: tuple) -> tuple:
        return (self._strip(args[0], self._pop()), *args[1:])

    def _strip_out(self, module: nn.Module, args: tuple, output: Any) -> Any:
        p = self._pop()
        bf = self.site.batch_first or self.site.style != "container"
        if isinstance(output, Tensor):
            return self._strip(output, p, bf)
        if hasattr(output, "keys"):  # ModelOutput: strip the sequence-shaped entries
            if output.get("last_hidden_state") is not None:
                output["last_hidden_state"] = self._strip(output["last_hidden_state"], p)
            if output.get("hidden_states") is not None:
                output["hidden_states"] = tuple(self._strip(h, p) for h in output["hidden_states"])
            return output
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (self._strip(output[0], p, bf), *output[1:])
        raise RuntimeError(f"cannot strip soft tokens from a {type(output).__name__}")

    def _container_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x = args[0] if args else kwargs.pop("x")
        before = len(self._inserted)
        x = self._insert(x, self.site.batch_first)
        p = self._inserted[-1] if len(self._inserted) > before else 0
        mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
        if p and mask is not None:
            mask = _widen_square_mask(mask, self.site.index, p)
            if len(args) > 1:
                args = (args[0], mask, *args[2:])
            else:
                kwargs["attn_mask"] = mask
        return (x, *args[1:]), kwargs

    def _hf_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        bound = _bind(module, args, kwargs)
        past = _cached_length(bound)
        embeds = bound.get("inputs_embeds")
        ids = bound.get("input_ids")
        if embeds is None and ids is None:
            self._inserted.append(0)
            return args, kwargs
        if past:
            # a cached generation step: the cache already holds the soft tokens, so only the
            # mask and positions account for them, and nothing is inserted or stripped
            n_prompt = self._active_prompt_length()
            self._inserted.append(0)
            if not n_prompt:
                return args, kwargs
            mask = bound.get("attention_mask")
            if mask is not None and mask.dim() == 2:
                bound["attention_mask"] = _insert_cols(mask, self.site.index, n_prompt, 1)
            if bound.get("position_ids") is not None:
                bound["position_ids"] = bound["position_ids"] + n_prompt
            return (), bound
        if embeds is None:
            assert self.site.embedding is not None
            embeds = self.site.embedding(ids)
        p = self.prompts(embeds.shape[0], embeds)
        n_prompt = 0 if p is None else p.shape[1]
        self._inserted.append(n_prompt)
        if not n_prompt:
            return args, kwargs
        i = self.site.index
        bound["input_ids"] = None
        bound["inputs_embeds"] = torch.cat([embeds[:, :i], p, embeds[:, i:]], dim=1)
        for name, fill in (("attention_mask", 1), ("token_type_ids", 0)):
            t = bound.get(name)
            if t is not None and t.dim() == 2:
                bound[name] = _insert_cols(t, i, n_prompt, fill)
        pos = bound.get("position_ids")
        if pos is not None:  # soft tokens take the positions from i on; later ones shift
            start = pos[:, i : i + 1] if pos.shape[1] > i else pos[:, -1:] + 1
            soft = start + torch.arange(n_prompt, device=pos.device)
            bound["position_ids"] = torch.cat([pos[:, :i], soft, pos[:, i:] + n_prompt], dim=1)
        return (), bound

    def _active_prompt_length(self) -> int:
        return sum(
            a.delta.tokens(1).shape[1] for a in self.attachments if self.state.runs(a.adapter)
        )


def _insert_cols(t: Tensor, index: int, n: int, fill: int) -> Tensor:
    pad = t.new_full((t.shape[0], n), fill)
    return torch.cat([t[:, :index], pad, t[:, index:]], dim=1)


def _cached_length(bound: dict[str, Any]) -> int:
    """Tokens already in a KV cache passed to a Hugging Face model (any argument name)."""
    for name in ("cache", "past_key_values"):
        cache = bound.get(name)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


_SIGNATURES: dict[type, inspect.Signature] = {}


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """All arguments of a forward call as keywords."""
    sig = _SIGNATURES.get(type(module))
    if sig is None:
        sig = _SIGNATURES.setdefault(type(module), inspect.signature(type(module).forward))
    bound = sig.bind(module, *args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{type(module).__name__}.forward got extra positional arguments")
        else:
            out[name] = value
    return out


def _widen_square_mask(mask: Tensor, index: int, p: int) -> Tensor:
    """Widen an ``(L, L)`` attention mask for ``p`` tokens inserted at ``index``.

    Real tokens may attend to the soft tokens; soft tokens attend only to soft tokens, so
    a causal stack stays causal (nothing reads the future through them).
    """
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"cannot widen an attention mask of shape {tuple(mask.shape)}")
    length = mask.shape[0]
    if mask.dtype == torch.bool:  # True = masked out
        allow, block = False, True
    else:
        allow, block = 0.0, float("-inf")
    new = mask.new_full((length + p, length + p), allow)
    real = torch.cat([torch.arange(index), torch.arange(index + p, length + p)]).to(mask.device)
    new[real.unsqueeze(1), real.unsqueeze(0)] = mask
    soft = torch.arange(index, index + p, device=mask.device)
    new[soft.unsqueeze(1), real.unsqueeze(0)] = block
    return new
