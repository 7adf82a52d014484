"""Hosts: the hooks that run delta modules inside a backbone without changing its modules.

One host per backbone module (per kind) holds every attachment on it, from every adapter,
and installs forward hooks only while it has attachments. The backbone's classes, its
parameters and its state dict are never replaced, so ``unload`` only removes hooks.

- :class:`ModuleHost`: output hooks on a module (slices of fused projections included).
- :class:`MHAHost`: routes ``nn.MultiheadAttention.forward`` through an equivalent
  implementation that projects q/k/v with the fused ``in_proj_weight`` once, lets deltas act
  on each slice, and calls ``out_proj`` as a module (so its hooks run). The base weights are
  never modified on the forward pass.
- :class:`~unipeft._sequence.SequenceHost` (its own module): soft tokens in a sequence.
"""

from __future__ import annotations

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
class Routing:
    """A mixed batch: which adapter each sample uses, grouped once per forward pass."""

    names: tuple[str, ...]
    groups: dict[str, Tensor]  # adapter -> indices of its samples (int64)
    _slots: dict[tuple, Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, names: tuple[str, ...], device: torch.device | None = None) -> Routing:
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        return cls(names, {k: torch.tensor(v, device=device) for k, v in groups.items()})

    def slots(self, adapters: tuple[str, ...], device: torch.device) -> Tensor:
        """``(N,)``: the position in ``adapters`` of each sample's adapter; ``len(adapters)``
        for samples whose adapter is not among them. Cached for the forward pass."""
        key = (adapters, device)
        slot = self._slots.get(key)
        if slot is None:
            slot = torch.full((len(self.names),), len(adapters), dtype=torch.int64)
            for j, name in enumerate(adapters):
                if name in self.groups:
                    slot[self.groups[name].cpu()] = j
            slot = self._slots[key] = slot.to(device)
        return slot

    def indices(self, adapter: str, device: torch.device) -> Tensor:
        idx = self.groups[adapter]
        if idx.device != device:
            idx = self.groups[adapter] = idx.to(device)
        return idx


@dataclass
class AdapterState:
    """What the hooks read on every forward: which adapters run, on which samples."""

    active: tuple[str, ...] = ()
    enabled: bool = True
    routing: Routing | None = None

    def runs(self, adapter: str) -> bool:
        if not self.enabled:
            return False
        if self.routing is not None:
            return adapter in self.routing.groups
        return adapter in self.active


@dataclass(eq=False)
class Attachment:
    adapter: str
    site: ModuleSite | SequenceSite
    delta: DeltaModule
    merged: bool = False


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
        self._stack_cache: dict[str, Any] = {}  # batched deltas keep stacked weights here
        self._transposed = _fusable_layout(module)
        self._overriding = False  # the module's forward is self._forward (no output hook)

    # --------------------------------------------------------------- bookkeeping
    def add(self, att: Attachment) -> None:
        self.attachments.append(att)
        if self.hook and not self._handles and not self._overriding:
            if self._transposed is not None and "forward" not in self.module.__dict__:
                # an instance attribute, deleted with the last attachment; with no hook the
                # module keeps PyTorch's fast call path
                self.module.forward = self._forward
                self._overriding = True
            else:
                hook = self.module.register_forward_hook(self._hook, with_kwargs=True)
                self._handles.append(hook)
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
            if self._overriding:
                if self.module.__dict__.get("forward") == self._forward:
                    del self.module.forward
                self._overriding = False

    @property
    def empty(self) -> bool:
        return not self.attachments

    def running(self) -> list[Attachment]:
        return [a for a in self.attachments if not a.merged and self.state.runs(a.adapter)]

    # --------------------------------------------------------------- forward
    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        """The module's forward while it has attachments (Linear and GPT-2 Conv1D only),
        in place of an output hook: when exactly one delta runs here and it can compute
        the whole output in one step (:meth:`DeltaModule.fused_linear`), it does;
        otherwise the module's own forward runs and the deltas act on its output."""
        m = self.module
        att = self._single_running()
        if att is not None and len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
            assert self._transposed is not None
            out = att.delta.fused_linear(args[0], m.weight, m.bias, self._transposed)
            if out is not None:
                return out
        output = type(m).forward(m, *args, **kwargs)
        new = self._hook(m, args, kwargs, output)
        return output if new is None else new

    def _single_running(self) -> Attachment | None:
        """The one running attachment, when there is exactly one, outside a mixed batch, on
        the whole output (no slice, no entry)."""
        if self.state.routing is not None:
            return None
        running = self.running()
        if len(running) != 1:
            return None
        att = running[0]
        return att if att.site.out_slice is None and att.site.entry is None else None

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
            done = self.try_update_slices(running, x, y) if not whole else None
            y = done if done is not None else self._apply_slices(sliced, x, y, dim)
        if whole:
            y = self.run_group(whole, x, y)
        return y

    def try_update_slices(
        self, running: list[Attachment], x: Tensor | None, y: Tensor
    ) -> Tensor | None:
        """One call for every slice of a fused output when a single delta class runs one
        delta per slice and can batch them (:meth:`DeltaModule.update_slices`)."""
        if x is None or self.state.routing is not None or len(running) < 2:
            return None
        cls = type(running[0].delta)
        if cls.update_slices is DeltaModule.update_slices:
            return None
        slices = [a.site.out_slice for a in running]
        if None in slices or len(set(slices)) != len(slices) or running[0].site.channel_dim != -1:
            return None
        if any(type(a.delta) is not cls or a.site.entry is not None for a in running):
            return None
        return cls.update_slices([a.delta for a in running], slices, x, y)  # type: ignore[arg-type]

    def run_group(self, atts: list[Attachment], x: Tensor | None, y: Tensor) -> Tensor:
        """Apply ``atts`` (all on the same output slice) in turn, or per sample group in a
        mixed batch: deltas that can batch (one kernel sequence for every adapter) do so,
        the others run on their samples only."""
        routing = self.state.routing
        if routing is None:
            for att in atts:  # y is ours: the module's fresh output or a delta's result
                y = att.delta.update_(self._input_for(att, x), y)
            return y
        if y.shape[0] != len(routing.names):
            raise ValueError(
                f"adapter_names has {len(routing.names)} entries but the batch at "
                f"{atts[0].site.name!r} has {y.shape[0]} samples; give one name per sample"
            )
        batchable: dict[type, list[Attachment]] = {}
        for att in atts:
            if type(att.delta).mixed is not DeltaModule.mixed:  # the class batches
                batchable.setdefault(type(att.delta), []).append(att)
        done: set[int] = set()
        for cls, group in batchable.items():
            xin = self._input_for(group[0], x)
            slots = routing.slots(tuple(a.adapter for a in group), y.device)
            out = cls.mixed([a.delta for a in group], xin, y, slots, self._stack_cache)
            if out is not None:
                y = out
                done.update(id(a) for a in group)
        for att in atts:
            if id(att) in done:
                continue
            idx = routing.indices(att.adapter, y.device)
            xin = self._input_for(att, x)
            xs = None if xin is None else xin.index_select(0, idx)
            y = y.index_copy(0, idx, att.delta(xs, y.index_select(0, idx)))
        return y

    def _apply_slices(
        self, sliced: dict[tuple[int, int], list[Attachment]], x: Tensor | None, y: Tensor, dim: int
    ) -> Tensor:
        pieces: list[Tensor] = []
        pos = 0
        total = y.shape[dim]
        in_place = True  # every slice was updated inside y itself: no concatenation needed
        for start, stop in sorted(sliced):
            if start > pos:
                pieces.append(y.narrow(dim, pos, start - pos))
            part = y.narrow(dim, start, stop - start)
            new = self.run_group(sliced[(start, stop)], x, part)
            in_place = in_place and new is part
            pieces.append(new)
            pos = stop
        if in_place:
            return y
        if pos < total:
            pieces.append(y.narrow(dim, pos, total - pos))
        return torch.cat(pieces, dim=dim)

    def _input_for(self, att: Attachment, x: Tensor | None) -> Tensor | None:
        entry = att.site.entry
        return x if entry is None else self._captured.get(id(entry))


def _fusable_layout(module: nn.Module) -> bool | None:
    """``False`` for an ``nn.Linear`` (weight ``(out, in)``), ``True`` for a GPT-2
    ``Conv1D`` (weight ``(in, out)``), ``None`` for modules whose forward is not replaced."""
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2:
        return True
    return None


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
