"""The effective-weight host: runs deltas on submodules whose weights their parent reads
directly instead of calling them.

Some blocks never call a submodule: transformers 5's Mamba mixer computes
``dt_proj.weight @ time_step`` and passes ``conv1d.weight`` to a causal-convolution
function (and, on CUDA, hands every projection's weight to one fused kernel), so a hook on
``dt_proj`` or ``conv1d`` would never run. A site there names the reading module as its
``host`` and the submodule as its ``module``. While a delta on such a site runs, this host
routes the parent's forward through **effective weights**: for each submodule with running
deltas, ``W'`` and ``b'`` are read off the deltas by running them on the submodule's own
output for a probe input (the rows of the identity and a zero row for a linear layer, unit
impulses for a depthwise convolution), exactly as :class:`~unipeft.runtime.RNNHost` does
for a recurrent layer's packed weights. The graph to the deltas' parameters is kept, so
they train. The parent's own forward then runs with those tensors in place of the
submodule's parameters for that one call, whether it reads them or calls the submodule
(the submodule's weights are what its own forward reads too); the parameters themselves are
never modified on the forward pass, and merging writes into them as on any site.

In a mixed batch the samples are split by adapter and the parent runs once per group (the
first positional argument and an ``attention_mask`` keyword split along the batch), with
the routing narrowed to that group so the hosts inside the parent see its samples only. A
cache is refused in a mixed batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract.sites import ModuleSite
from .module_host import ModuleHost
from .state import AdapterState, Attachment, Routing


class EffectiveWeightHost:
    """Routes one parent module through the effective weights of its adapted submodules."""

    def __init__(self, parent: nn.Module, state: AdapterState) -> None:
        self.parent = parent
        self.state = state
        self.children: dict[str, tuple[nn.Module, ModuleHost]] = {}  # path below parent

    # --------------------------------------------------------------- kind (see hosts.py)
    @staticmethod
    def claims(site: Any) -> bool:
        """Sites whose module's weights the ``host`` module reads in its own arithmetic
        (a submodule of it, accepting merged-form methods only)."""
        return (
            isinstance(site, ModuleSite)
            and site.merged_form_only is not None
            and site.host is not None
            and site.module is not site.host
            and not isinstance(site.host, (nn.RNNBase, nn.MultiheadAttention))
        )

    @staticmethod
    def anchor(site: ModuleSite) -> nn.Module:
        assert site.host is not None
        return site.host

    @classmethod
    def create(cls, site: ModuleSite, state: AdapterState) -> EffectiveWeightHost:
        return cls(cls.anchor(site), state)

    # --------------------------------------------------------------- bookkeeping
    def add(self, att: Attachment, table: Any = None) -> None:
        key = _child_path(att.site)
        if key not in self.children:
            child = att.site.module  # type: ignore[union-attr]
            if not probe_supported(child):
                raise TypeError(
                    f"site {att.site.name!r}: no effective-weight probe for "
                    f"{type(child).__name__}; only nn.Linear and depthwise nn.Conv1d "
                    "submodules can be adapted where their parent reads their weights"
                )
            self.children[key] = (child, ModuleHost(child, self.state, hook=False))
        if "forward" not in self.parent.__dict__:
            self.parent.forward = self._forward  # instance attribute shadows the class method
        self.children[key][1].add(att)

    def remove(self, att: Attachment, table: Any = None) -> None:
        key = _child_path(att.site)
        host = self.children[key][1]
        host.remove(att)
        if host.empty:
            del self.children[key]
        if not self.children and self.parent.__dict__.get("forward") == self._forward:
            del self.parent.forward

    @property
    def empty(self) -> bool:
        return not self.children

    # --------------------------------------------------------------- forward
    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        running = {k: atts for k, (_, h) in self.children.items() if (atts := h.running())}
        if not running:
            return type(self.parent).forward(self.parent, *args, **kwargs)
        routing = self.state.routing
        if routing is None:
            return self._run(self._effective(running, None), args, kwargs)
        return self._mixed(running, routing, args, kwargs)

    def _effective(
        self, running: dict[str, list[Attachment]], adapter: str | None
    ) -> dict[str, dict[str, Tensor]]:
        """By child path, the tensors to run it with (``weight`` and ``bias``): for each
        child with deltas running (those of ``adapter`` only, when given), what they make
        of its weight and bias."""
        out: dict[str, dict[str, Tensor]] = {}
        for key, atts in running.items():
            if adapter is not None:
                atts = [a for a in atts if a.adapter == adapter]
                if not atts:
                    continue
            child, host = self.children[key]
            x, y, read = _probe(child)
            if adapter is None:
                y = host.run_group(atts, x, y)
            else:  # one adapter's samples of a mixed batch: its deltas in turn
                for att in atts:
                    y = att.delta(x, y)
            w, b = read(y)
            tensors = {"weight": w.to(child.weight.dtype)}
            bias = getattr(child, "bias", None)
            if bias is not None:
                tensors["bias"] = b.to(bias.dtype)
            elif bool((b != 0).any()):
                raise RuntimeError(
                    f"site {atts[0].site.name!r}: the deltas give {type(child).__name__} a "
                    "bias, but it was built without one; target it with a method that adds "
                    "no bias (LoRA and the other reparameterized methods)"
                )
            out[key] = tensors
        return out

    def _run(self, tensors: dict[str, dict[str, Tensor]], args: tuple, kwargs: dict) -> Any:
        with _swapped(self.parent, tensors):
            return type(self.parent).forward(self.parent, *args, **kwargs)

    def _mixed(
        self, running: dict[str, list[Attachment]], routing: Routing, args: tuple, kwargs: dict
    ) -> Any:
        """A mixed batch: the parent runs once per adapter on that adapter's samples."""
        name = type(self.parent).__name__
        if not args or not isinstance(args[0], Tensor):
            raise ValueError(
                f"a mixed batch (adapter_names) through {name} needs its input as the first "
                "positional argument; call the model once per adapter instead"
            )
        if any(v is not None for k, v in kwargs.items() if k in ("cache", "cache_params")):
            raise ValueError(
                f"a mixed batch (adapter_names) cannot run through {name} with a cache: each "
                "adapter's samples would need a cache of their own. Call the model once per "
                "adapter, or without a cache"
            )
        x = args[0]
        n = x.shape[0]
        if n != len(routing.names):
            raise ValueError(
                f"adapter_names has {len(routing.names)} entries but the batch at {name} "
                f"has {n} samples; give one name per sample"
            )
        parts: list[tuple[Tensor, Any]] = []
        try:
            for adapter in routing.groups:
                idx = routing.indices(adapter, x.device)
                sub = dict(kwargs)
                mask = sub.get("attention_mask")
                if isinstance(mask, Tensor) and mask.shape[:1] == (n,):
                    sub["attention_mask"] = mask.index_select(0, idx)
                self.state.routing = Routing.of((adapter,) * len(idx), x.device)
                out = self._run(
                    self._effective(running, adapter), (x.index_select(0, idx), *args[1:]), sub
                )
                parts.append((idx, out))
        finally:
            self.state.routing = routing
        if len(parts) == 1:
            return parts[0][1]
        if not all(isinstance(out, Tensor) for _, out in parts):
            raise ValueError(
                f"{name} returned no single tensor; a mixed batch cannot be put back "
                "together from its output. Call the model once per adapter"
            )
        first = parts[0][1]
        full = first.new_zeros((n, *first.shape[1:]))
        for idx, out in parts:
            full = full.index_copy(0, idx, out)
        return full


def _child_path(site: Any) -> str:
    host_path = site.host_path or ""
    path = site.path
    return path[len(host_path) + 1 :] if host_path and path.startswith(host_path + ".") else path


@contextmanager
def _swapped(parent: nn.Module, tensors: dict[str, dict[str, Tensor]]) -> Iterator[None]:
    """The children's parameters replaced by plain tensors for one call, each in its slot
    of the module's parameter table (so the order of ``state_dict`` and every reader of
    ``child.weight`` see the same layout); put back on the way out."""
    saved: list[tuple[nn.Module, str, Any]] = []
    try:
        for key, values in tensors.items():
            child = parent.get_submodule(key)
            for pname, value in values.items():
                saved.append((child, pname, child._parameters[pname]))
                child._parameters[pname] = value  # type: ignore[assignment]
        yield
    finally:
        for child, pname, param in reversed(saved):
            child._parameters[pname] = param


def _probe(child: nn.Module) -> tuple[Tensor, Tensor, Any]:
    """``(x, y, read)``: a probe input, the child's output for it, and a function that
    turns the deltas' version of that output into ``(weight, bias)``."""
    w = child.weight
    b = getattr(child, "bias", None)
    if isinstance(child, nn.Linear):
        n_in = w.shape[1]
        eye = torch.eye(n_in, dtype=w.dtype, device=w.device)
        x = torch.cat([eye, eye.new_zeros(1, n_in)])

        def read_linear(y: Tensor) -> tuple[Tensor, Tensor]:
            bias = y[-1]
            return (y[:-1] - bias).t().contiguous(), bias

        return x, F.linear(x, w, b), read_linear
    if _depthwise(child):
        # depthwise: channel c's output at position t is sum_k W[c, 0, k] x[c, t - p + k].
        # Sample k holds a unit impulse at position k in every channel, the last sample
        # none; the output position whose window is exactly the input reads W[:, 0, k] + b
        (k,) = child.kernel_size
        channels = child.in_channels
        x = torch.zeros(k + 1, channels, k, dtype=w.dtype, device=w.device)
        x[torch.arange(k), :, torch.arange(k)] = 1
        (at,) = child.padding  # the output t with t - pad = 0: its window is inputs 0..k-1

        def read_depthwise(y: Tensor) -> tuple[Tensor, Tensor]:
            col = y[:, :, at]  # (k + 1, C)
            bias = col[-1]
            return (col[:-1] - bias).t().unsqueeze(1).contiguous(), bias

        return x, type(child).forward(child, x), read_depthwise
    raise TypeError(
        f"no effective-weight probe for {type(child).__name__}: only nn.Linear and depthwise "
        "nn.Conv1d submodules can be adapted where their parent reads their weights"
    )


def _depthwise(child: nn.Module) -> bool:
    """A depthwise ``nn.Conv1d`` with unit stride and dilation and integer zero padding."""
    return (
        isinstance(child, nn.Conv1d)
        and child.groups == child.in_channels == child.out_channels
        and child.stride == (1,)
        and child.dilation == (1,)
        and isinstance(child.padding, tuple)
        and child.padding_mode == "zeros"
    )


def probe_supported(child: nn.Module) -> bool:
    """Whether :class:`EffectiveWeightHost` can read effective weights off ``child``."""
    return isinstance(child, nn.Linear) or _depthwise(child)
