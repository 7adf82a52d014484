"""LoRA on a mixed batch: each sample through its own adapter, in a fixed number of kernels
whatever the number of adapters.

Three kernels, picked per call by :func:`choose_kernel` (the rule is written there):

- ``masked``: every adapter's ``x A_j^T`` at once (``(…, Σr)`` columns), the columns of
  other adapters zeroed per sample, one ``addmm_`` with every ``s_j B_j`` side by side. No
  gather, three kernels; the zeroed columns are wasted work, small while ``Σr`` is;
- ``bgmv`` (batched gather matrix-vector, after punica's BGMV): each sample gathers its
  adapter's factors, padded to the largest rank, and two batched matmuls run, the second
  accumulating into the output in place. Differentiable: the path taken with gradients;
- ``sgmv`` (segmented gather, after punica's SGMV): samples sorted by adapter once per
  routing, then one grouped GEMM for the shrink ``x A_j^T`` and one for the expand over
  the segments, through ``torch._grouped_mm``. That is a private torch API: it is probed
  once per device and dtype (:func:`grouped_mm_works`) and the path falls back to ``bgmv``
  wherever the probe fails.

Without gradients, stacked factors are kept per site while the deltas' registered factors
are the same tensors at the same version counters (as DoRA's cached norms: a write through
``p.data`` is not seen); what depends on the routing (masks, gathered factors, the sort) is
kept per routing tensor, which the model reuses for the same ``adapter_names``. Checked
against the per-group path in ``tests/test_mixed_kernels.py`` and
``tests/test_fast_paths.py``, and by the conformance kit's ``mixed_batch_matches``.
"""

from __future__ import annotations

import contextlib
import operator
import weakref
from collections.abc import Iterator
from itertools import chain
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ....contract.errors import UnipeftError
from .fast import _view

if TYPE_CHECKING:
    from .delta import LoraDelta

KERNELS = ("auto", "masked", "bgmv", "sgmv")
MASKED_MAX_RANK = 128
"""``Σr`` up to which the masked kernel runs on GPUs: below it its GEMMs stay bound by
reading the activations (an H200 does ~200 bf16 FLOPs per byte read), so the zeroed
columns cost little; above it their arithmetic grows with ``Σr``."""

_VERSION = operator.attrgetter("_version")
_PARAMETERS = operator.attrgetter("_parameters")
_SCALING = operator.attrgetter("scaling")
_TRAINING = operator.attrgetter("training")
_forced = "auto"


class MixedKernelError(UnipeftError):
    """An unknown mixed-batch kernel name."""


@contextlib.contextmanager
def use_kernel(name: str) -> Iterator[None]:
    """Inside the block, mixed batches without gradients use kernel ``name`` (one of
    :data:`KERNELS`) wherever it applies, for benchmarks and tests; ``"auto"`` restores
    :func:`choose_kernel`'s rule. With gradients the differentiable ``bgmv`` always runs."""
    global _forced
    if name not in KERNELS:
        raise MixedKernelError(f"mixed-batch kernel {name!r} is unknown; use one of {KERNELS}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def choose_kernel(
    total_rank: int,
    rank: int,
    samples: int,
    adapters: int,
    tokens: int,
    d_in: int,
    d_out: int,
    device: torch.device,
) -> str:
    """The kernel for a mixed batch without gradients.

    ``total_rank``: ``Σr`` of the ``adapters`` at the site; ``rank``: the largest ``r``;
    ``samples`` of ``tokens`` tokens each; ``d_in``/``d_out``: the projection's sizes.

    1. on the CPU, ``bgmv``: arithmetic dominates there, and it does the least;
    2. on GPUs, ``bgmv`` when there are no more samples than adapters + 1: its gathered
       factors are then kept for the routing, and it is two batched matmuls, no more
       kernels than one adapter's LoRA and no wasted columns;
    3. ``masked`` while ``Σr ≤ MASKED_MAX_RANK`` (three kernels, no gather);
    4. beyond, the one that moves fewer extra bytes: ``bgmv`` writes and reads the gathered
       factors (``samples · r · (d_in + d_out)``), ``sgmv`` the grouped expand's output
       before adding it (``samples · tokens · d_out``). So ``sgmv`` for short samples
       (decoding), ``bgmv`` for long ones (prefill), and ``bgmv`` where
       ``torch._grouped_mm`` is absent.
    """
    if device.type == "cpu" or samples <= adapters + 1:
        return "bgmv"
    if total_rank <= MASKED_MAX_RANK:
        return "masked"
    if tokens * d_out < rank * (d_in + d_out):
        return "sgmv"
    return "bgmv"


# ============================================================================ the factors


def registered(deltas: list | tuple, names: tuple[str, ...]) -> tuple[Tensor, ...] | None:
    """The tensors registered as parameters ``names`` of every delta, flat, read from each
    module's ``_parameters`` (``nn.Module.__getattr__`` costs more than the kernels of a
    small batch, times the adapters). ``None`` when one is not registered (an engine such
    as FSDP1 replaced it by a plain attribute): nothing derived from them is kept then."""
    try:
        return tuple(chain.from_iterable(map(itemgetter(*names), map(_PARAMETERS, deltas))))
    except KeyError:
        return None


def unchanged(params: tuple[Tensor, ...], now: tuple[Tensor, ...] | None, versions: tuple) -> bool:
    """Whether ``now`` holds the very tensors ``params``, at ``versions``."""
    return (
        now is not None
        and len(now) == len(params)
        and all(map(operator.is_, now, params))
        and tuple(map(_VERSION, now)) == versions
    )


class _Stacks:
    """One site's factors of one list of deltas, and what is derived from them, while no
    factor changes (another tensor or a moved version counter, a scaling set, another list
    of deltas)."""

    def __init__(self, deltas: list[LoraDelta], params: tuple[Tensor, ...]) -> None:
        self.deltas = tuple(deltas)
        self.params = params
        self.versions = tuple(map(_VERSION, params))
        self.scalings = tuple(map(_SCALING, deltas))
        self.droppers = tuple(d for d in deltas if isinstance(d.dropout, nn.Dropout))
        self.conv = any(d.shape.is_conv for d in deltas)
        self.ranks = [d.r for d in deltas]
        self.total, self.rank = sum(self.ranks), max(self.ranks)
        self.made: dict[tuple, Any] = {}  # (what, dtype, device) -> tensors
        self.routed: tuple[weakref.ref, dict] | None = None  # per routing: masks

    def current(self, deltas: list[LoraDelta], params: tuple[Tensor, ...]) -> bool:
        return (
            len(deltas) == len(self.deltas)
            and all(map(operator.is_, deltas, self.deltas))
            and unchanged(self.params, params, self.versions)
            and tuple(map(_SCALING, deltas)) == self.scalings
        )

    def drops(self) -> bool:
        return any(map(_TRAINING, self.droppers))

    def per_routing(self, slots: Tensor) -> dict:
        ref = self.routed
        if ref is None or ref[0]() is not slots:
            ref = self.routed = (weakref.ref(slots), {})
        return ref[1]

    def get(self, what: str, dtype: torch.dtype, device: torch.device, build: Any) -> Any:
        key = (what, dtype, device)
        out = self.made.get(key)
        if out is None:
            with torch.no_grad():
                out = self.made[key] = build()
        return out


def _stacks(deltas: list[LoraDelta], cache: dict) -> _Stacks | None:
    """The site's current stacks, or ``None`` when the factors are not registered
    parameters (nothing is kept then)."""
    params = registered(deltas, ("A", "B"))
    if params is None:
        return None
    st = cache.get("lora_stacks")
    if st is None or not st.current(deltas, params):
        st = cache["lora_stacks"] = _Stacks(deltas, params)
    return st


def _padded(
    deltas: tuple | list, width: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``A`` ``(k+1, width, in)`` and ``s·B`` ``(k+1, out, width)``, ranks padded with
    zeros, the last slot all zero (samples without an adapter here). Differentiable."""
    a = torch.stack([F.pad(d.A, (0, 0, 0, width - d.r)) for d in deltas])
    b = torch.stack([F.pad(d.B * d.scaling, (0, width - d.r)) for d in deltas])
    a = torch.cat([a, a.new_zeros(1, *a.shape[1:])]).to(device=device, dtype=dtype)
    b = torch.cat([b, b.new_zeros(1, *b.shape[1:])]).to(device=device, dtype=dtype)
    return a, b


# ============================================================================ the kernels


def _mixed_masked(
    deltas: list[LoraDelta], x: Tensor, y: Tensor, slots: Tensor, cache: dict
) -> Tensor | None:
    """The masked kernel, without gradients: ``None`` when it does not apply (``Σr`` over
    512, an output that cannot be viewed as rows, samples that are not the batch's first
    dimension)."""
    st = _stacks(deltas, cache)
    width = y.shape[-1]
    n = x.shape[0]
    y2 = _view(y, (-1, width))
    if st is None or st.total > 512 or y2 is None or y.shape[0] != n:
        return None

    def build() -> tuple[Tensor, Tensor, Tensor]:
        a = torch.cat([d.A for d in deltas]).to(device=x.device, dtype=x.dtype)
        b = torch.cat([d.B * d.scaling for d in deltas], dim=1).to(x.device, y.dtype)
        owner = torch.repeat_interleave(torch.arange(len(deltas)), torch.tensor(st.ranks)).to(
            slots.device
        )
        return a, b, owner

    a, b, owner = st.get(f"masked {y.dtype}", x.dtype, x.device, build)
    routed = st.per_routing(slots)
    mask = routed.get(("mask", x.dtype))
    if mask is None:  # one mask per routing (the model keeps those)
        mask = routed[("mask", x.dtype)] = (slots.unsqueeze(1) == owner).to(x.dtype)
    h = F.linear(x, a).view(n, -1, st.total)
    h.mul_(mask.unsqueeze(1))
    y2.addmm_(h.view(-1, st.total).to(y.dtype), b.t())
    return y


def _bgmv(
    deltas: list[LoraDelta], x: Tensor, y: Tensor, slots: Tensor, st: _Stacks | None
) -> Tensor:
    """Per-sample gather of padded factors and two batched matmuls; differentiable when
    ``st`` (the current stacks, which hold no graph) is ``None``. With ``st``, the gathered
    factors are kept for the routing while they are no larger than the stacks (no more
    samples than adapters + 1): two kernels fewer per call, memory at most doubled."""
    if st is None:
        a, b = _padded(deltas, max(d.r for d in deltas), x.dtype, x.device)
        at, bt = a[slots].transpose(1, 2), b.to(y.dtype)[slots].transpose(1, 2)
    else:
        routed = st.per_routing(slots)
        key = ("gathered", x.dtype, y.dtype)
        pair = routed.get(key)
        if pair is None:
            a, b = st.get(
                "padded", x.dtype, x.device, lambda: _padded(deltas, st.rank, x.dtype, x.device)
            )
            pair = a[slots].transpose(1, 2), b.to(y.dtype)[slots].transpose(1, 2)
            if slots.shape[0] <= len(deltas) + 1:
                routed[key] = pair
        at, bt = pair
    n = x.shape[0]
    h = torch.bmm(x.reshape(n, -1, x.shape[-1]), at)
    grad = torch.is_grad_enabled() and (y.requires_grad or h.requires_grad)
    y3 = _view(y, (n, -1, y.shape[-1]))
    if not grad and y3 is not None:
        y3.baddbmm_(h.to(y.dtype), bt)
        return y
    return torch.baddbmm(y.reshape(n, -1, y.shape[-1]), h.to(y.dtype), bt).reshape(y.shape)


class _Order:
    """A routing's samples sorted by slot: ``order`` (``None`` when already sorted),
    ``counts`` per slot, ``m`` samples that have an adapter here."""

    def __init__(self, slots: Tensor, k: int) -> None:
        host = slots.cpu()  # one device sync per routing, shared by every site
        counts = torch.bincount(host, minlength=k + 1).tolist()
        self.m = sum(counts[:k])
        order = torch.argsort(host, stable=True)
        sorted_ = bool(torch.equal(order[: self.m], torch.arange(self.m)))
        self.order = None if sorted_ else order[: self.m].to(slots.device)
        self.counts = counts[:k]
        self.offsets: dict[int, Tensor] = {}

    def offs(self, tokens: int, device: torch.device) -> Tensor:
        out = self.offsets.get(tokens)
        if out is None:
            ends = torch.tensor(self.counts, dtype=torch.int64).cumsum(0) * tokens
            out = self.offsets[tokens] = ends.to(device=device, dtype=torch.int32)
        return out


_ORDERS: dict[tuple[int, int], tuple[weakref.ref, _Order]] = {}


def _order(slots: Tensor, k: int) -> _Order:
    """The sort of a routing, shared by every site that sees the same slots tensor (the
    routing keeps one per tuple of adapters and device): one device sync per routing."""
    key = (id(slots), k)
    hit = _ORDERS.get(key)
    if hit is not None and hit[0]() is slots:
        return hit[1]
    order = _Order(slots, k)
    _ORDERS[key] = (weakref.ref(slots), order)
    while len(_ORDERS) > 16:  # recent routings only (the model keeps eight)
        _ORDERS.pop(next(iter(_ORDERS)))
    return order


def _sgmv(
    deltas: list[LoraDelta], x: Tensor, y: Tensor, slots: Tensor, st: _Stacks
) -> Tensor | None:
    """Grouped shrink and expand over the samples sorted by adapter; without gradients.
    ``None`` where ``torch._grouped_mm`` cannot take these operands."""
    if not grouped_mm_works(x.device, x.dtype) or y.dtype != x.dtype:
        return None
    n, d_in, d_out = x.shape[0], x.shape[-1], y.shape[-1]
    align = 16 // x.element_size()  # grouped GEMMs want 16-byte aligned rows
    if d_in % align or d_out % align or y.shape[0] != n:
        return None
    width = -(-st.rank // align) * align
    a, b = st.get("grouped", x.dtype, x.device, lambda: _padded(deltas, width, x.dtype, x.device))
    order = _order(slots, len(deltas))
    if order.m == 0:
        return y
    tokens = x.numel() // (n * d_in)
    x3 = x.reshape(n, tokens, d_in)
    xs = x3[: order.m] if order.order is None else x3.index_select(0, order.order)
    xs = xs.reshape(order.m * tokens, d_in).contiguous()
    offs = order.offs(tokens, x.device)
    k = len(deltas)
    h = torch._grouped_mm(xs, a[:k].transpose(1, 2), offs=offs)
    z = torch._grouped_mm(h, b[:k].transpose(1, 2), offs=offs).view(order.m, tokens, d_out)
    y3 = _view(y, (n, tokens, d_out))
    if y3 is None:
        y3 = y.reshape(n, tokens, d_out).clone()
    if order.order is None:
        y3[: order.m].add_(z)
    else:
        y3.index_add_(0, order.order, z)
    return y3.view(y.shape)


_GROUPED: dict[tuple, bool] = {}


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` (private: present from torch 2.8, on CUDA for bf16, on
    other devices and dtypes depending on the version) runs here and gives the segmented
    products, an empty segment included. Probed once per device and dtype."""
    key = (device.type, device.index, dtype)
    ok = _GROUPED.get(key)
    if ok is None:
        ok = _GROUPED[key] = _probe(device, dtype)
    return ok


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 16, generator=gen).to(device=device, dtype=dtype)
    w = torch.randn(3, 8, 16, generator=gen).to(device=device, dtype=dtype)
    try:
        with torch.no_grad():
            out = fn(
                x,
                w.transpose(1, 2),
                offs=torch.tensor([8, 8, 24], device=device, dtype=torch.int32),
            )
    except Exception:  # absent for this device or dtype: the other kernels serve
        return False
    ref = torch.cat([x[:8] @ w[0].t(), x[8:] @ w[2].t()]).float()
    return out.shape == ref.shape and bool(torch.allclose(out.float(), ref, atol=5e-2, rtol=2e-2))


# ============================================================================ the entry


def mixed_batch(
    deltas: list[LoraDelta], x: Tensor | None, y: Tensor, slots: Tensor, cache: dict
) -> Tensor | None:
    """Every adapter's LoRA on its own samples (``slots``: each sample's position in
    ``deltas``, ``len(deltas)`` for none), possibly written into ``y``. ``None`` declines
    (convolutions, active dropout): the host then runs each delta on its own samples."""
    if x is None:
        return None
    # with gradients (stacks in the autograd graph), under torch.compile (no Python caches
    # in a traced graph) and for factors an engine manages: stacked afresh on every call
    fresh = torch.is_grad_enabled() or torch.compiler.is_compiling()
    st = None if fresh else _stacks(deltas, cache)
    if st is None:
        if any(d.shape.is_conv or d.drops for d in deltas):
            return None
        return _bgmv(deltas, x, y, slots, None)
    if st.conv or st.drops():
        return None
    kernel = _forced
    if kernel == "auto":
        n, d_in = x.shape[0], x.shape[-1]
        tokens = x.numel() // max(n * d_in, 1)
        k = len(deltas)
        kernel = choose_kernel(st.total, st.rank, n, k, tokens, d_in, y.shape[-1], x.device)
    out = None
    if kernel == "masked":
        out = _mixed_masked(deltas, x, y, slots, cache)
    elif kernel == "sgmv":
        out = _sgmv(deltas, x, y, slots, st)
    return out if out is not None else _bgmv(deltas, x, y, slots, st)
