"""The sequence host: soft tokens inserted into a token sequence and stripped again.

Each of a structure map's three styles (see :class:`~unipeft.contract.sites.SequenceSite`) hooks in
differently; all of them insert the active adapters' tokens at the site's index and remove
them from the outputs, so the backbone's output shapes do not change. Hugging Face text
models also get their attention mask, token types and positions widened, with KV-cache
generation and mixed batches (per-sample prompts, padded and masked) handled; prefix deltas
(:meth:`~unipeft.DeltaModule.prefix`) at their token sequence enter as a key/value cache that
already holds ``P`` positions, as Hugging Face PEFT's prefix tuning does.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..contract.deltas import provides_prefix
from ..contract.sites import SequenceSite
from .state import AdapterState, Attachment


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

    @staticmethod
    def claims(site: Any) -> bool:
        return isinstance(site, SequenceSite)

    @staticmethod
    def anchor(site: SequenceSite) -> nn.Module:
        return site.insert

    @classmethod
    def create(cls, site: SequenceSite, state: AdapterState) -> SequenceHost:
        return cls(site, state)

    def add(self, att: Attachment, table: Any = None) -> None:
        self.attachments.append(att)
        if not self._handles:
            self._install()

    def remove(self, att: Attachment, table: Any = None) -> None:
        self.attachments.remove(att)
        if not self.attachments:
            for h in self._handles:
                h.remove()
            self._handles.clear()

    def _prompt_atts(self) -> list[Attachment]:
        return [a for a in self.attachments if not provides_prefix(a.delta)]

    def _prefix_atts(self) -> list[Attachment]:
        """The running prefix attachments (refused in a mixed batch)."""
        atts = [a for a in self.attachments if provides_prefix(a.delta)]
        if self.state.routing is not None:
            if any(self.state.runs(a.adapter) for a in atts):
                raise ValueError(
                    "mixed batches with soft prompts or prefixes: a prefix adapter's keys "
                    f"and values at {self.site.name!r} would be seen by every sample. Run "
                    "these adapters in separate batches."
                )
            return []
        return self.state.running(atts)

    def prompts(self, batch: int, ref: Tensor) -> Tensor | None:
        if self.state.routing is not None:
            if any(self.state.runs(a.adapter) for a in self._prompt_atts()):
                raise ValueError(
                    f"mixed batches with soft prompts need an attention mask to hide other "
                    f"samples' prompts; {self.site.name!r} has none (only Hugging Face text "
                    "models have one). Run these adapters in separate batches."
                )
            return None
        running = self.state.running(self._prompt_atts())
        chunks = [a.delta.tokens(batch).to(ref.dtype) for a in running]
        return torch.cat(chunks, dim=1) if chunks else None

    def mixed_prompts(self, ref: Tensor) -> tuple[Tensor, Tensor] | None:
        """Per-sample soft tokens for a mixed batch: ``(N, P, D)`` padded to the longest
        adapter's tokens, and the ``(N, P)`` mask (0 for padding, for samples of adapters
        without tokens here, and for ``__base__``)."""
        routing = self.state.routing
        assert routing is not None
        running = [a for a in self._prompt_atts() if self.state.runs(a.adapter)]
        if not running:
            return None
        n = len(routing.names)
        if ref.shape[0] != n:
            raise ValueError(
                f"adapter_names has {n} entries but the batch at {self.site.name!r} has "
                f"{ref.shape[0]} samples; give one name per sample"
            )
        per = {}
        for att in running:
            per.setdefault(att.adapter, []).append(att.delta.tokens(1)[0])
        per = {k: torch.cat(v, dim=0) for k, v in per.items()}
        p = max(t.shape[0] for t in per.values())
        tokens = ref.new_zeros(n, p, ref.shape[-1])
        mask = torch.zeros(n, p, dtype=torch.long, device=ref.device)
        for name, t in per.items():
            idx = routing.indices(name, ref.device)
            tokens = tokens.index_copy(
                0, idx, F.pad(t.to(ref.dtype), (0, 0, 0, p - t.shape[0])).expand(len(idx), -1, -1)
            )
            mask[idx, : t.shape[0]] = 1
        return tokens, mask

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
        at = _mask_position(module)
        mask = args[at] if len(args) > at else kwargs.get("attn_mask")
        if p and mask is not None:
            mask = _widen_square_mask(mask, self.site.index, p)
            if len(args) > at:
                args = (*args[:at], mask, *args[at + 1 :])
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
        if past and self.state.routing is not None and self._active_prompt_length():
            raise ValueError("mixed batches with soft prompts do not support cached generation")
        prefix_atts = self._prefix_atts()
        if not prefix_atts:
            return self._hf_prompts(module, args, kwargs, bound, past)
        args, kwargs = self._hf_prompts(module, args, kwargs, dict(bound), past)
        bound = kwargs if not args else _bind(module, args, kwargs)
        return self._hf_prefixed(module, bound, past, prefix_atts)

    def _hf_prompts(
        self, module: nn.Module, args: tuple, kwargs: dict, bound: dict[str, Any], past: int
    ) -> tuple[tuple, dict]:
        """The soft-prompt part of :meth:`_hf_pre` (records how many tokens it inserted)."""
        embeds = bound.get("inputs_embeds")
        ids = bound.get("input_ids")
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
        soft_mask = None
        if self.state.routing is not None:
            mixed = self.mixed_prompts(embeds)
            p, soft_mask = mixed if mixed is not None else (None, None)
        else:
            p = self.prompts(embeds.shape[0], embeds)
        n_prompt = 0 if p is None else p.shape[1]
        limit = self.site.max_length
        if n_prompt and limit is not None and embeds.shape[1] + n_prompt > limit:
            raise ValueError(
                f"input_ids has {embeds.shape[1]} tokens and the active adapters insert "
                f"{n_prompt} soft tokens at {self.site.name!r}: {embeds.shape[1] + n_prompt} "
                f"positions, but the model's position table holds {limit}; give at most "
                f"{limit - n_prompt} input tokens"
            )
        self._inserted.append(n_prompt)
        if not n_prompt:
            return args, kwargs
        i = self.site.index
        bound["input_ids"] = None
        bound["inputs_embeds"] = torch.cat([embeds[:, :i], p, embeds[:, i:]], dim=1)
        if soft_mask is not None and bound.get("attention_mask") is None:
            bound["attention_mask"] = torch.ones(
                embeds.shape[:2], dtype=torch.long, device=embeds.device
            )
        for name, fill in (("attention_mask", 1), ("token_type_ids", 0)):
            t = bound.get(name)
            if t is not None and t.dim() == 2:
                if name == "attention_mask" and soft_mask is not None:
                    soft = soft_mask.to(t.dtype)
                    bound[name] = torch.cat([t[:, :i], soft, t[:, i:]], dim=1)
                else:
                    bound[name] = _insert_cols(t, i, n_prompt, fill)
        pos = bound.get("position_ids")
        if soft_mask is not None and not bool(soft_mask.all()):
            # samples carry different numbers of real soft tokens: give each sample the
            # positions it would have alone, so absolute and rotary positions match
            if pos is None and "position_ids" in _signature(module).parameters:
                pos = torch.arange(embeds.shape[1], device=embeds.device).expand(len(embeds), -1)
            if pos is not None:
                count = soft_mask.sum(dim=1, keepdim=True)
                start = pos[:, i : i + 1] if pos.shape[1] > i else pos[:, -1:] + 1
                soft = start + torch.arange(n_prompt, device=pos.device)
                bound["position_ids"] = torch.cat([pos[:, :i], soft, pos[:, i:] + count], dim=1)
            return (), bound
        if pos is not None:  # soft tokens take the positions from i on; later ones shift
            start = pos[:, i : i + 1] if pos.shape[1] > i else pos[:, -1:] + 1
            soft = start + torch.arange(n_prompt, device=pos.device)
            bound["position_ids"] = torch.cat([pos[:, :i], soft, pos[:, i:] + n_prompt], dim=1)
        return (), bound

    def _active_prompt_length(self) -> int:
        return sum(
            a.delta.tokens(1).shape[1] for a in self._prompt_atts() if self.state.runs(a.adapter)
        )

    def _hf_prefixed(
        self, module: nn.Module, bound: dict[str, Any], past: int, atts: list[Attachment]
    ) -> tuple[tuple, dict]:
        """A forward with prefix adapters running: soft prompts first (the prompt path
        on the arguments), then the prefixes as a cache of ``P`` positions in front of
        everything, with ``P`` visible columns in front of the attention mask and
        ``position_ids`` (when given) moved on by ``P``. On a cached step the cache already
        holds the prefixes; only the mask and positions account for them."""
        bound = dict(bound)
        ref = bound.get("inputs_embeds")
        if ref is None:
            ids = bound.get("input_ids")
            assert ids is not None
            ref = ids
            dtype = self.site.reference_tensor().dtype
        else:
            dtype = ref.dtype
        batch = ref.shape[0]
        pairs = [a.delta.prefix(batch) for a in atts]
        n_prefix = sum(k.shape[2] for k, _ in pairs)
        limit = self.site.max_length
        total = (past or n_prefix) + ref.shape[1]
        if limit is not None and total > limit:
            raise ValueError(
                f"the active adapters' prefixes take {n_prefix} cached positions at "
                f"{self.site.name!r} and the input {total - (past or n_prefix)} more: {total} "
                f"positions, but the model's position table holds {limit}; give at most "
                f"{limit - (past or n_prefix)} input tokens, or shorter prefixes"
            )
        if not past:
            cache = _cache_argument(bound)
            if cache is None:
                from transformers import DynamicCache

                cache = DynamicCache()
            keys = torch.cat([k for k, _ in pairs], dim=2).to(dtype)
            values = torch.cat([v for _, v in pairs], dim=2).to(dtype)
            heads = _kv_heads(module)
            for layer in range(keys.shape[1]):
                k = keys[:, layer].unflatten(-1, (heads, -1)).transpose(1, 2)
                v = values[:, layer].unflatten(-1, (heads, -1)).transpose(1, 2)
                cache.update(k, v, layer)
            bound[_cache_name(module, bound)] = cache
        mask = bound.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            bound["attention_mask"] = _insert_cols(mask, 0, n_prefix, 1)
        if bound.get("position_ids") is not None:
            bound["position_ids"] = bound["position_ids"] + n_prefix
        return (), bound


def _insert_cols(t: Tensor, index: int, n: int, fill: int) -> Tensor:
    pad = t.new_full((t.shape[0], n), fill)
    return torch.cat([t[:, :index], pad, t[:, index:]], dim=1)


def _cache_argument(bound: dict[str, Any]) -> Any:
    """An (empty) cache object the caller passed, to fill in place (``generate`` keeps it)."""
    for name in ("past_key_values", "cache"):
        cache = bound.get(name)
        if cache is not None and hasattr(cache, "update") and hasattr(cache, "get_seq_length"):
            return cache
    return None


def _cache_name(module: nn.Module, bound: dict[str, Any]) -> str:
    params = _signature(module).parameters
    for name in ("past_key_values", "cache"):
        if name in params or name in bound:
            return name
    return "past_key_values"


def _kv_heads(module: nn.Module) -> int:
    """Key/value heads of a Hugging Face text model's attention (grouped-query aware)."""
    config = module.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = next(
        int(v)
        for v in (getattr(config, n, None) for n in ("num_attention_heads", "n_head", "num_heads"))
        if isinstance(v, int)
    )
    return int(getattr(config, "num_key_value_heads", None) or heads)


def _cached_length(bound: dict[str, Any]) -> int:
    """Tokens already in a KV cache passed to a Hugging Face model (any argument name)."""
    for name in ("cache", "past_key_values"):
        cache = bound.get(name)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


_SIGNATURES: dict[type, inspect.Signature] = {}


def _signature(module: nn.Module) -> inspect.Signature:
    sig = _SIGNATURES.get(type(module))
    if sig is None:
        sig = _SIGNATURES.setdefault(type(module), inspect.signature(type(module).forward))
    return sig


def _bind(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """All arguments of a forward call as keywords."""
    sig = _signature(module)
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


def _mask_position(module: nn.Module) -> int:
    """Where a container's positional attention mask sits: its ``attn_mask`` parameter (an
    open_clip block takes ``(q_x, k_x, v_x, attn_mask)``), else the second argument."""
    params = list(_signature(module).parameters)[1:]
    return params.index("attn_mask") if "attn_mask" in params else 1


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
