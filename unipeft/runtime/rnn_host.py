"""The recurrent host: runs deltas on the packed weights of an ``nn.LSTM``, ``nn.GRU`` or
``nn.RNN``.

A recurrent layer multiplies its input and recurrent weights inside one fused kernel, step
after step, so no delta can act on a projection's output there. While a delta on the layer
runs, this host routes the layer's forward through **effective weights** instead: for each
weight with running deltas, ``W'`` and ``b'`` are read off the deltas by running them on
the projection of the identity, ``x = [I; 0]`` and ``y = x Wᵀ + b``, the same call a module
host makes on a real output. Every delta with a merged-weight form (the only ones the sites
accept) is affine in ``x``, so the result's last row is ``b'`` and its other rows are
``W'ᵀ + b'``. Unlike :meth:`~unipeft.DeltaModule.merged` (written for the merge ledger,
and free to run without gradients) this keeps the graph to the delta's parameters, and the
deltas compose exactly as a module host composes them: in attachment order, under
``Average`` and ``Fuse`` too. The layer's own forward then runs with those weights in place
of its own for the one call; its parameters are never modified on the forward pass.

Dropout on a delta's input becomes, here, dropout of the input columns of the delta's
change (one mask for the whole batch and every time step). In a mixed batch the samples
are split by adapter and the layer runs once per group, on tensors in either layout (with
``hx`` split alike); a ``PackedSequence`` is refused in a mixed batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..contract.sites import ModuleSite
from .module_host import ModuleHost
from .state import AdapterState, Attachment, Routing


class RNNHost:
    """Routes one recurrent layer through its effective weights while a delta on it runs."""

    def __init__(self, rnn: nn.RNNBase, state: AdapterState) -> None:
        self.rnn = rnn
        self.state = state
        self.weights: dict[str, ModuleHost] = {}  # weight name -> the deltas on it

    # --------------------------------------------------------------- kind (see hosts.py)
    @staticmethod
    def claims(site: Any) -> bool:
        """The sites on a recurrent layer's own weights (``rnn.ih`` / ``rnn.hh``)."""
        return (
            isinstance(site, ModuleSite)
            and site.weight is not None
            and isinstance(site.host, nn.RNNBase)
            and site.module is site.host
        )

    @staticmethod
    def anchor(site: ModuleSite) -> nn.Module:
        assert isinstance(site.host, nn.RNNBase)
        return site.host

    @classmethod
    def create(cls, site: ModuleSite, state: AdapterState) -> RNNHost:
        return cls(cls.anchor(site), state)  # type: ignore[arg-type]

    # --------------------------------------------------------------- bookkeeping
    def add(self, att: Attachment, table: Any = None) -> None:
        name = _weight_name(att)
        host = self.weights.get(name)
        if host is None:
            host = self.weights[name] = ModuleHost(self.rnn, self.state, hook=False)
        if "forward" not in self.rnn.__dict__:
            self.rnn.forward = self._forward  # instance attribute shadows the class method
        host.add(att)

    def remove(self, att: Attachment, table: Any = None) -> None:
        name = _weight_name(att)
        host = self.weights[name]
        host.remove(att)
        if host.empty:
            del self.weights[name]
        if not self.weights and self.rnn.__dict__.get("forward") == self._forward:
            del self.rnn.forward

    @property
    def empty(self) -> bool:
        return not self.weights

    # --------------------------------------------------------------- forward
    def _forward(self, input: Any, hx: Any = None) -> Any:
        running = {name: atts for name, host in self.weights.items() if (atts := host.running())}
        if not running:
            return type(self.rnn).forward(self.rnn, input, hx)
        routing = self.state.routing
        if routing is None:
            return self._run(self._effective(running, None), input, hx)
        return self._mixed(running, routing, input, hx)

    def _effective(self, running: dict[str, list[Attachment]], adapter: str | None) -> dict:
        """The tensors to run the layer with, by parameter name: for each weight with
        deltas running (those of ``adapter`` only, when given), its effective weight and
        bias."""
        m = self.rnn
        out: dict[str, Tensor] = {}
        for name, atts in running.items():
            if adapter is not None:
                atts = [a for a in atts if a.adapter == adapter]
                if not atts:
                    continue
            site = atts[0].site
            assert isinstance(site, ModuleSite) and site.weight is not None
            w = getattr(m, name)
            b = getattr(m, site.weight.bias_name, None)
            x, y = _probe(w, b)
            if adapter is None:
                y = self.weights[name].run_group(atts, x, y)
            else:  # one adapter's samples of a mixed batch: its deltas in turn
                for att in atts:
                    y = att.delta(x, y)
            new_b = y[-1]
            out[name] = (y[:-1] - new_b).t().contiguous().to(w.dtype)
            if b is not None:
                out[site.weight.bias_name] = new_b.to(b.dtype)
            elif bool((new_b != 0).any()):
                raise RuntimeError(
                    f"site {site.name!r}: the deltas give the layer a bias, but this "
                    f"nn.{type(m).__name__} was built with bias=False; target only its "
                    "weights with a method that adds no bias (LoRA and the other "
                    "reparameterized methods), or build the layer with bias=True"
                )
        return out

    def _run(self, tensors: dict[str, Tensor], input: Any, hx: Any) -> Any:
        """The layer's own forward, with ``tensors`` in place of its parameters of those
        names for this call only (the packed-weight list its kernel reads is swapped and
        put back; the parameters themselves are untouched)."""
        m = self.rnn
        if not tensors:
            return type(m).forward(m, input, hx)
        refresh = getattr(m, "_update_flat_weights", None)
        if refresh is not None:  # let the layer re-read replaced parameters first, as its
            refresh()  # forward would, so that the swapped list below is what it runs
        own = m._flat_weights
        m._flat_weights = [tensors.get(n, w) for n, w in zip(m._flat_weights_names, own)]
        try:
            return type(m).forward(m, input, hx)
        finally:
            m._flat_weights = own

    def _mixed(
        self, running: dict[str, list[Attachment]], routing: Routing, input: Any, hx: Any
    ) -> Any:
        """A mixed batch: the layer runs once per adapter on that adapter's samples."""
        m = self.rnn
        if isinstance(input, PackedSequence):
            raise ValueError(
                f"a mixed batch (adapter_names) cannot run through nn.{type(m).__name__} with "
                "a PackedSequence input: the samples of each adapter would need a packing of "
                "their own. Pass a padded tensor, or call the model once per adapter"
            )
        batched = input.dim() == 3
        dim = (0 if m.batch_first else 1) if batched else None
        n = input.shape[dim] if dim is not None else 1
        if n != len(routing.names):
            raise ValueError(
                f"adapter_names has {len(routing.names)} entries but the batch at "
                f"nn.{type(m).__name__} has {n} samples; give one name per sample"
            )
        parts: list[tuple[Tensor, Any]] = []
        for adapter in routing.groups:
            idx = routing.indices(adapter, input.device)
            tensors = self._effective(running, adapter)
            if dim is None:
                return self._run(tensors, input, hx)
            h = None if hx is None else _map(hx, lambda t, i=idx: t.index_select(1, i))
            parts.append((idx, self._run(tensors, input.index_select(dim, idx), h)))
        if len(parts) == 1:
            return parts[0][1]
        output = _scatter([(i, r[0]) for i, r in parts], dim, n)  # type: ignore[arg-type]
        state = parts[0][1][1]
        if isinstance(state, tuple):  # LSTM: (h, c)
            hidden: Any = tuple(
                _scatter([(i, r[1][k]) for i, r in parts], 1, n) for k in range(len(state))
            )
        else:
            hidden = _scatter([(i, r[1]) for i, r in parts], 1, n)
        return output, hidden


def _probe(w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
    """``x = [I; 0]`` and ``y = x Wᵀ + b``, in the weight's dtype (the one deltas expect)."""
    n_in = w.shape[1]
    eye = torch.eye(n_in, dtype=w.dtype, device=w.device)
    x = torch.cat([eye, eye.new_zeros(1, n_in)])
    return x, F.linear(x, w, b)


def _weight_name(att: Attachment) -> str:
    site = att.site
    assert isinstance(site, ModuleSite) and site.weight is not None
    return site.weight.weight_name


def _map(value: Any, fn: Any) -> Any:
    return tuple(fn(t) for t in value) if isinstance(value, tuple) else fn(value)


def _scatter(parts: list[tuple[Tensor, Tensor]], dim: int, n: int) -> Tensor:
    """One tensor of ``n`` samples along ``dim`` from each group's indices and result."""
    first = parts[0][1]
    shape = list(first.shape)
    shape[dim] = n
    full = first.new_zeros(shape)
    for idx, part in parts:
        full = full.index_copy(dim, idx, part)
    return full
