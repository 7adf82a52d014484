"""Routers for mixtures of experts, and their auxiliary losses.

A router maps a site's input ``x`` to gates ``g`` over ``E`` experts with a linear map
``logits = W_r h`` (``W_r`` ``(E, d)``, no bias), ``p = softmax(logits)``, then one of:

- ``soft``: ``g = p`` (every expert runs, weighted);
- ``top_k``: the ``k`` largest probabilities kept and renormalised to sum to one,
  ``g_i = p_i / Σ_{j∈K} p_j`` for ``i ∈ K``, 0 otherwise (Shazeer et al., 2017);
- ``top_p``: the smallest set ``P`` of experts, taken by decreasing probability, whose mass
  reaches ``p``: ``Σ_{j∈P} p_j ≥ top_p`` (at least one expert), renormalised the same way
  (dynamic routing, Huang et al., *Harder Tasks Need More Experts: Dynamic Routing in MoE
  Models*, 2024, arXiv:2403.07652).

``h`` is the input at every position (``routing="token"``) or its mean over every position
of a sample (``routing="sample"``: dims ``1 .. ndim-2`` of a batch-first ``(N, ..., d)``
input; padding positions are averaged in too), one set of gates per sample then.

The losses of the last routing, for ``aux_loss()``:

- load balancing (Switch Transformers, Fedus et al., 2021, arXiv:2101.03961):
  ``L_bal = E · Σ_i f_i · P_i``; ``P_i`` the mean router probability of expert ``i`` over the
  routed rows (tokens or samples), ``f_i`` the share of the routing decisions that went to
  ``i`` (the experts with a non-zero gate, counted once per row; for the soft router, which
  keeps all experts, each row's decision is its most probable expert, as Switch's top-1).
  ``f`` carries no gradient; ``L_bal = 1`` when both are uniform;
- router z-loss (ST-MoE, Zoph et al., 2022, arXiv:2202.08906):
  ``L_z = mean_rows (logsumexp_i logits_i)²``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RouterKind = Literal["soft", "top_k", "top_p"]
RoutingLevel = Literal["token", "sample"]


def top_k_gates(probs: Tensor, k: int) -> Tensor:
    """Zero all but the ``k`` largest probabilities of the last dim; renormalise the rest."""
    k = min(k, probs.shape[-1])
    top, idx = probs.topk(k, dim=-1)
    return torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))


def top_p_mask(probs: Tensor, p: float) -> Tensor:
    """Boolean mask of the smallest set of experts (by decreasing probability) whose mass
    reaches ``p``; never empty. An expert is kept when the mass of the experts before it in
    the order is still below ``p``."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p
    keep_sorted = before < p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def top_p_gates(probs: Tensor, p: float) -> Tensor:
    """:func:`top_p_mask`'s experts, their probabilities renormalised to sum to one."""
    kept = probs * top_p_mask(probs, p)
    return kept / kept.sum(-1, keepdim=True)


def gates_from_probs(probs: Tensor, kind: RouterKind, top_k: int = 1, top_p: float = 1.0) -> Tensor:
    """The gates of router ``kind`` from softmax probabilities ``(..., E)``."""
    if kind == "soft":
        return probs
    if kind == "top_k":
        return top_k_gates(probs, top_k)
    if kind == "top_p":
        return top_p_gates(probs, top_p)
    raise ValueError(f"unknown router {kind!r}: use soft, top_k or top_p")


def dispatch(gates: Tensor, probs: Tensor, kind: RouterKind) -> Tensor:
    """The routing decisions, one-hot or multi-hot ``(rows, E)`` floats: the experts with a
    non-zero gate, or the most probable expert for the soft router."""
    n = probs.shape[-1]
    if kind == "soft":
        return F.one_hot(probs.reshape(-1, n).argmax(-1), n).to(probs.dtype)
    return (gates.reshape(-1, n) > 0).to(probs.dtype)


def load_balancing_loss(probs: Tensor, chosen: Tensor) -> Tensor:
    """``E · Σ_i f_i · P_i``: ``probs`` ``(..., E)``, ``chosen`` the routing decisions
    (:func:`dispatch`); ``f`` = each expert's share of the decisions (no gradient), ``P`` =
    its mean probability. 1 when both are uniform."""
    n = probs.shape[-1]
    counts = chosen.reshape(-1, n).sum(0)
    share = (counts / counts.sum().clamp_min(1.0)).detach()
    return n * (share * probs.reshape(-1, n).mean(0)).sum()


def z_loss(logits: Tensor) -> Tensor:
    """``mean (logsumexp logits)²`` over the rows of ``(..., E)`` logits."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def pool_per_sample(x: Tensor) -> Tensor:
    """``(N, ..., d) -> (N, d)``: the mean over every position of each sample."""
    return x if x.ndim <= 2 else x.mean(dim=tuple(range(1, x.ndim - 1)))


class Router(nn.Module):
    """A linear router ``(..., d) -> gates (..., E)`` (see the module docstring).

    The logits and gates are computed in float32 whatever the input's dtype. With
    ``routing="sample"`` the gates are ``(N, 1, ..., 1, E)`` for an ``ndim``-d output, so
    that they broadcast over each sample's positions. The logits, probabilities and
    decisions of the last call are kept (plain attributes) for :meth:`balance_loss` and
    :meth:`z_loss`. ``weight`` starts ``N(0, init_std²)``.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        kind: RouterKind = "soft",
        *,
        top_k: int = 1,
        top_p: float = 1.0,
        routing: RoutingLevel = "token",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if kind not in ("soft", "top_k", "top_p"):
            raise ValueError(f"unknown router {kind!r}: use soft, top_k or top_p")
        if routing not in ("token", "sample"):
            raise ValueError(f"unknown routing {routing!r}: use token or sample")
        self.weight = nn.Parameter(torch.empty(num_experts, in_features))
        nn.init.normal_(self.weight, std=init_std)
        self.kind: RouterKind = kind
        self.top_k = top_k
        self.top_p = top_p
        self.routing: RoutingLevel = routing
        self.last: tuple[Tensor, Tensor, Tensor] | None = None
        self.tape: list[Tensor] | None = None
        """Set by :func:`same_choices`: the hard routing decisions recorded (or to replay)."""
        self.replaying = False

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def logits(self, x: Tensor) -> Tensor:
        # in float32 whatever the input's dtype: a low-precision router would flip near-tied
        # top-k / top-p choices, which changes the output by a whole expert
        h = pool_per_sample(x.float()) if self.routing == "sample" else x.float()
        return F.linear(h, self.weight.float())

    def forward(self, x: Tensor, out_ndim: int | None = None) -> Tensor:
        logits = self.logits(x)
        probs = torch.softmax(logits, dim=-1)
        if self.replaying and self.tape:  # the experts another run chose, renormalised
            kept = probs * self.tape.pop(0).to(probs.device)
            gates = kept / kept.sum(-1, keepdim=True)
        else:
            gates = gates_from_probs(probs, self.kind, self.top_k, self.top_p)
            if self.tape is not None and not self.replaying and self.kind != "soft":
                self.tape.append(gates > 0)
        self.last = (logits, probs, dispatch(gates, probs, self.kind))
        if self.routing == "sample":
            ndim = out_ndim if out_ndim is not None else x.ndim
            gates = gates.reshape(gates.shape[0], *([1] * max(ndim - 2, 0)), gates.shape[-1])
        return gates

    def balance_loss(self) -> Tensor | None:
        """:func:`load_balancing_loss` of the last call (None before any)."""
        if self.last is None:
            return None
        _, probs, chosen = self.last
        return load_balancing_loss(probs, chosen)

    def z_loss(self) -> Tensor | None:
        """:func:`z_loss` of the last call's logits (None before any)."""
        return None if self.last is None else z_loss(self.last[0])

    def aux_loss(self, balance: float, z: float) -> Tensor | None:
        """``balance · L_bal + z · L_z`` of the last call; None when both are 0 or before
        any call."""
        if self.last is None or (balance == 0 and z == 0):
            return None
        total = self.weight.new_zeros((), dtype=torch.float32)
        if balance:
            total = total + balance * load_balancing_loss(self.last[1], self.last[2])
        if z:
            total = total + z * z_loss(self.last[0])
        return total


def router_parameters(in_features: int, num_experts: int) -> int:
    """``d · E``: the size of a :class:`Router`."""
    return in_features * num_experts


@contextmanager
def same_choices(record: nn.Module, replay: nn.Module) -> Iterator[None]:
    """Make the hard routers of ``replay`` choose what those of ``record`` chose.

    Inside the block, run ``record`` first, then ``replay`` on the same inputs: each top-k or
    top-p :class:`Router` of ``record`` notes which experts it chose on each call, and the
    router at the same position in ``replay`` uses those experts (their probabilities,
    renormalised) instead of choosing. Two copies of one adapter in different precisions
    can then be compared: a near-tie that rounding breaks the other way moves an output by
    a whole expert, which is not an error of the half-precision computation."""
    pairs = list(zip(_routers(record), _routers(replay), strict=True))
    for a, b in pairs:
        a.tape = b.tape = []  # one list: a appends, b takes from the front
        b.replaying = True
    try:
        yield
    finally:
        for a, b in pairs:
            a.tape, b.tape, b.replaying = None, None, False


def _routers(model: nn.Module) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]
