"""Delta modules and the five family base classes of the PEFT taxonomy.

A delta module is the trainable piece one method attaches at one site. At a module site it
is called as ``delta(x, y) -> y'``: ``x`` is the site's input (``(..., in_features)`` for a
projection; ``(N, C, *spatial)`` for a convolution), ``y`` the site's output restricted to
the site's slice of channels, and the return value replaces ``y``. At a sequence site it
provides ``tokens(batch_size) -> (N, P, D)`` soft tokens.

Each family base owns what its members share, so a method's own file holds only what is
particular to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sites import Layout, ModuleSite

Family = Literal["additive", "selective", "reparameterized", "hybrid", "moe"]
FAMILIES: tuple[Family, ...] = ("additive", "selective", "reparameterized", "hybrid", "moe")


@dataclass(frozen=True)
class ProjectionShape:
    """The flat geometry a projection delta needs (no reference to the backbone)."""

    in_features: int
    out_features: int
    layout: Layout = "linear"
    kernel_size: tuple[int, ...] = ()
    conv_args: dict = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def of(cls, site: ModuleSite) -> ProjectionShape:
        if site.weight is None:
            raise TypeError(f"site {site.name!r} is not a projection")
        w = site.weight
        return cls(w.in_features, site.features, w.layout, w.kernel_size, dict(w.conv_args))

    @property
    def is_conv(self) -> bool:
        return self.layout == "conv"

    def project(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """Apply a weight in canonical ``(out, in, *kernel)`` layout to ``x``."""
        if not self.is_conv:
            return F.linear(x, weight, bias)
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.kernel_size) - 1]
        return conv(x, weight, bias, **self.conv_args)


class DeltaModule(nn.Module):
    """Root of every delta module. Concrete methods subclass one family base.

    What unipeft does with a delta's state, for every method alike:

    - **parameters** are trainable (the backbone is frozen), saved, counted by
      ``num_trainable_parameters`` and checked against the method's formula;
    - **buffers** registered with ``register_buffer`` (persistent, the default) are saved
      and loaded with the parameters but never counted or trained; ``persistent=False``
      buffers are neither saved nor loaded, so they must be rebuilt by ``__init__``;
    - both are created on the site's device and cast to its dtype when the delta is
      attached (``delta.to(device, dtype)``: floating tensors only, integer buffers keep
      their dtype), and move with the model afterwards (``model.to(...)``, ``.half()``);
    - plain attributes (a tensor kept in ``__dict__``, a reference to the site) are none of
      these: not saved, not moved, not cast.

    A delta may implement :class:`~unipeft.contract.fastpath.FastPath` for fused kernels.
    """

    family: ClassVar[Family]

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def use_shared(self, shared: nn.Module) -> None:
        """Keep the adapter's shared module (:attr:`Method.shared`) as :attr:`shared`: a
        reference, not a submodule, so its tensors are saved, counted and moved once, by the
        adapter, and never as part of this delta's state dict."""
        object.__setattr__(self, "_unipeft_shared", shared)

    @property
    def shared(self) -> nn.Module:
        """The adapter's shared module given to :meth:`use_shared`."""
        try:
            return self.__dict__["_unipeft_shared"]
        except KeyError:
            raise AttributeError(
                f"{type(self).__name__} has no shared module; its method has no shared()"
            ) from None

    def lr_scale(self) -> dict[str, float]:
        """Learning-rate multipliers for some of this delta's parameters, by their name in
        the delta (e.g. LoRA+'s ``{"B": 16.0}``); the others train at the base rate.
        :func:`unipeft.param_groups` builds the optimizer's groups from them."""
        return {}

    def tokens(self, batch_size: int) -> Tensor:
        """Soft tokens ``(batch_size, P, D)`` for a sequence site."""
        raise TypeError(f"{type(self).__name__} does not provide tokens")

    def prefix(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """Optional: learned keys and values prepended to an attention's own (prefix
        tuning). At an ``attn`` module site: ``(keys, values)``, each ``(N, P, D_kv)``
        (``D_kv``: the width of the site's keys, all heads); at a Hugging Face text model's
        token sequence: each ``(N, L, P, D_kv)``, one entry per layer of the stack. A delta
        that implements it is run by the attention hosts, not called as ``forward``."""
        raise TypeError(f"{type(self).__name__} does not provide prefix keys and values")

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """New ``(weight, bias)`` of the site with this delta folded in.

        Called only for methods registered ``mergeable=True``, at sites whose
        :meth:`~unipeft.ModuleSite.merge_refusal` is ``None``: projections (``weight`` is
        in canonical ``(out, in, *kernel)`` layout restricted to the site's slice) and
        affine norms (``weight`` is the norm's own 1-D scale ``(features,)``; tell them
        apart by ``site.weight is None``). ``bias`` may be ``None``; returning a bias then
        creates one, zero-initialised, for as long as the merge lasts. Return new tensors:
        the merge ledger copies them into the backbone and restores the original bits on
        unmerge.
        """
        raise TypeError(f"{type(self).__name__} cannot be merged")

    def aux_loss(self) -> Tensor | None:
        """An auxiliary loss from the last forward pass, if the delta keeps one."""
        return None


def provides_prefix(delta: DeltaModule) -> bool:
    """Whether ``delta``'s class implements :meth:`DeltaModule.prefix`."""
    return type(delta).prefix is not DeltaModule.prefix


def _channels_last(y: Tensor, channel_dim: int) -> Tensor:
    return y if channel_dim in (-1, y.ndim - 1) else y.movedim(channel_dim, -1)


def _channels_back(y: Tensor, channel_dim: int) -> Tensor:
    return y if channel_dim in (-1, y.ndim - 1) else y.movedim(-1, channel_dim)


# --------------------------------------------------------------------------- reparameterized


class ReparameterizedDelta(DeltaModule):
    """A delta weight ``ΔW`` built from few parameters, added to a projection: mergeable.

    Subclasses implement :meth:`delta_weight` (and optionally :meth:`delta_bias`); the
    default forward applies ``ΔW`` to the input, subclasses may compute it in factored form.
    The :class:`ProjectionShape` given to ``__init__`` is kept as ``self.shape`` (a plain
    attribute: not saved, not moved).
    """

    family = "reparameterized"

    def __init__(self, shape: ProjectionShape) -> None:
        super().__init__()
        self.shape = shape

    def delta_weight(self) -> Tensor:  # pragma: no cover - abstract
        """``ΔW`` in ``(out, in, *kernel)`` layout."""
        raise NotImplementedError

    def delta_bias(self) -> Tensor | None:
        return None

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        return y + self.shape.project(x, self.delta_weight().to(x.dtype), self.delta_bias())

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        new_weight = weight + self.delta_weight().to(weight.dtype).reshape(weight.shape)
        db = self.delta_bias()
        if db is None:
            return new_weight, bias
        return new_weight, (db if bias is None else bias + db.to(bias.dtype))


# --------------------------------------------------------------------------- additive


class AdditiveDelta(DeltaModule):
    """New modules added to the network: serial or parallel adapters, or soft tokens.

    Module-site members implement :meth:`transform`; the base adds
    ``scaling * transform(h)`` to the site's output, where ``h`` is the output itself
    (``serial``) or the site's input (``parallel``). Sequence-site members implement
    :meth:`tokens`. Members that act differently (e.g. rescaling) override ``forward``.
    """

    family = "additive"

    def __init__(
        self,
        placement: Literal["serial", "parallel"] = "serial",
        scaling: float = 1.0,
        channel_dim: int = -1,
    ) -> None:
        super().__init__()
        self.placement = placement
        self.scaling = scaling
        self.channel_dim = channel_dim

    def transform(self, h: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``(..., features) -> (..., features)`` with channels last."""
        raise NotImplementedError

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        h = y if self.placement == "serial" else x
        if h is None:
            raise RuntimeError("a parallel delta needs the site's input, which was not captured")
        out = self.transform(_channels_last(h, self.channel_dim))
        return y + self.scaling * _channels_back(out, self.channel_dim)


# --------------------------------------------------------------------------- selective


class SelectiveDelta(DeltaModule):
    """Tunes an existing parameter (bias or weight) of the site.

    The backbone's tensor stays frozen; the delta holds the change ``values`` in the
    parameter's shape. The effective parameter is ``base + dense()``; :meth:`merged` folds
    it in. A method that tunes only some entries overrides :meth:`dense` (and stores what
    it needs to rebuild the full change from its own parameters).
    """

    family = "selective"

    def __init__(
        self,
        target: Literal["bias", "weight"],
        param_shape: tuple[int, ...],
        *,
        projection: ProjectionShape | None = None,
        channel_dim: int = -1,
    ) -> None:
        super().__init__()
        if target == "weight" and projection is None:
            raise TypeError("a selective weight delta needs the projection's shape")
        self.target = target
        self.param_shape = tuple(param_shape)
        self.projection = projection
        self.channel_dim = channel_dim
        self.values = nn.Parameter(torch.zeros(self.param_shape))

    def dense(self) -> Tensor:
        """The change to the parameter, in its shape."""
        return self.values

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        d = self.dense().to(y.dtype)
        if self.target == "bias":
            shape = [1] * y.ndim
            shape[self.channel_dim] = -1
            return y + d.view(shape)
        assert x is not None and self.projection is not None
        return y + self.projection.project(x, d.to(x.dtype))

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        d = self.dense()
        if self.target == "bias":
            return weight, (d.to(weight.dtype) if bias is None else bias + d.to(bias.dtype))
        return weight + d.to(weight.dtype).reshape(weight.shape), bias


# --------------------------------------------------------------------------- hybrid


class Gate(nn.Module):
    """``sigmoid(w·h + b)``, one value per position; ``h`` is the site's input or output."""

    def __init__(self, features: int, source: Literal["input", "output"]) -> None:
        super().__init__()
        self.source = source
        self.proj = nn.Linear(features, 1)

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        h = x if self.source == "input" else y
        assert h is not None
        return torch.sigmoid(self.proj(h))


class ScalarGate(nn.Module):
    """``sigmoid(g)``: one learned gate, for parts without a per-position signal (tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        return torch.sigmoid(self.logit)


class HybridDelta(DeltaModule):
    """Gated composition of child deltas (UniPELT, MAM...).

    Each child's contribution ``child(x, y) - y`` is scaled by its gate before being added;
    a child without a gate contributes fully. At a sequence site the children's tokens are
    concatenated, each scaled by its gate.
    """

    family = "hybrid"

    def __init__(self, parts: dict[str, DeltaModule], gates: dict[str, nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.gates = nn.ModuleDict(gates)

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        out = y
        for name, part in self.parts.items():
            change = part(x, y) - y
            if name in self.gates:
                change = self.gates[name](x, y) * change
            out = out + change
        return out

    def tokens(self, batch_size: int) -> Tensor:
        chunks = []
        for name, part in self.parts.items():
            t = part.tokens(batch_size)
            chunks.append(t * self.gates[name]() if name in self.gates else t)
        return torch.cat(chunks, dim=1)


# --------------------------------------------------------------------------- mixture of experts


class MixtureOfExpertsDelta(DeltaModule):
    """A router over expert deltas (any module-site delta), soft or top-k.

    ``y' = y + Σ_e g_e(x) (expert_e(x, y) - y)``. With ``top_k`` the gates outside the k
    largest router probabilities are zero and the kept ones renormalised. The
    load-balancing loss of the last forward, ``E · Σ_e f_e · P_e`` (f: share of tokens sent
    to e, P: mean router probability of e; 1 when balanced), is read with :meth:`aux_loss`.
    """

    family = "moe"

    def __init__(
        self, in_features: int, experts: list[DeltaModule], top_k: int | None = None
    ) -> None:
        super().__init__()
        if not experts:
            raise ValueError("a mixture needs at least one expert")
        self.router = nn.Linear(in_features, len(experts), bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        self.experts = nn.ModuleList(experts)
        self.top_k = top_k if top_k is not None and top_k < len(experts) else None
        self._aux: Tensor | None = None

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(gates, probs)``, both ``(..., E)``."""
        probs = torch.softmax(self.router(x).float(), dim=-1)
        if self.top_k is None:
            return probs, probs
        top, idx = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        return gates, probs

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        gates, probs = self.gates(x)
        n = len(self.experts)
        chosen = (gates > 0).float().reshape(-1, n).mean(0)
        share = chosen / chosen.sum().clamp_min(1e-9)
        self._aux = n * (share.detach() * probs.reshape(-1, n).mean(0)).sum()
        gates = gates.to(y.dtype)
        out = y
        for e, expert in enumerate(self.experts):
            out = out + gates[..., e : e + 1] * (expert(x, y) - y)
        return out

    def aux_loss(self) -> Tensor | None:
        return self._aux
