"""LoRA: a low-rank update ``ΔW = (α / r) · B A`` of a projection (Hu et al., 2021)."""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config import DeltaConfig
from ..delta import ProjectionShape, ReparameterizedDelta
from ..registry import Method
from ..sites import Site


class LoraConfig(DeltaConfig):
    r: int = Field(8, ge=1, le=4096, description="rank of the update")
    alpha: float = Field(16.0, gt=0, description="scale numerator: ΔW is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of A")
    use_rslora: bool = Field(
        False, description="rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski, 2023)"
    )
    init: Literal["kaiming", "gaussian", "orthogonal"] = Field(
        "kaiming",
        description="init of A; B always starts at zero, so the adapter is the identity at init",
    )


def low_rank_factors(
    shape: ProjectionShape, r: int, init: str
) -> tuple[nn.Parameter, nn.Parameter]:
    """``A`` ``(r, in, *kernel)`` initialised by ``init`` (kaiming, gaussian or orthogonal)
    and ``B`` ``(out, r)`` at zero, so ``B A = 0``: the factors of LoRA and of DoRA."""
    a = nn.Parameter(torch.empty(r, shape.in_features, *shape.kernel_size))
    if init == "kaiming":
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    elif init == "gaussian":
        nn.init.normal_(a, std=1.0 / r)
    else:
        nn.init.orthogonal_(a.view(r, -1))
    return a, nn.Parameter(torch.zeros(shape.out_features, r))


class LoraDelta(ReparameterizedDelta):
    """``y + s · B(A(dropout(x)))``. ``A``: ``(r, in, *kernel)``, ``B``: ``(out, r)``."""

    def __init__(
        self,
        shape: ProjectionShape,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
    ) -> None:
        super().__init__(shape)
        self.r = r
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.A, self.B = low_rank_factors(shape, r, init)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._shared: SharedDown | None = None  # set by link(); not a submodule

    def delta_weight(self) -> Tensor:
        w = self.B @ self.A.reshape(self.r, -1)
        return (w * self.scaling).reshape(self.shape.out_features, *self.A.shape[1:])

    def down(self, x: Tensor) -> Tensor:
        """``dropout(x) A^T``: ``(..., r)``. Taken from the adapter's shared projection when
        another site read the same ``x`` first (see :class:`SharedDown`)."""
        shared = self._shared
        if (
            shared is not None
            and not (self.training and isinstance(self.dropout, nn.Dropout))
            and not torch.compiler.is_compiling()  # the compiler fuses on its own
        ):
            return shared.down(self, x)
        h = self.dropout(x)
        return F.linear(h, self.A.to(h.dtype))

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        if self.shape.is_conv:
            h = self.shape.project(self.dropout(x), self.A.to(x.dtype))
            b = self.B.to(h.dtype).reshape(*self.B.shape, *([1] * len(self.shape.kernel_size)))
            conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.shape.kernel_size) - 1]
            return y + conv(h, b) * self.scaling
        return add_low_rank(y, self.down(x), self.B, self.scaling)

    def update_(self, x: Tensor | None, y: Tensor) -> Tensor:
        if self.shape.is_conv or x is None:
            return self(x, y)
        h = self.down(x)
        grad = torch.is_grad_enabled() and (
            y.requires_grad or h.requires_grad or self.B.requires_grad
        )
        return add_low_rank(y, h, self.B, self.scaling, inplace=not grad)

    def fused_linear(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool
    ) -> Tensor | None:
        """The site's whole output ``x W^T + b + s · x A^T B^T`` in one step (see
        :meth:`DeltaModule.fused_linear`). With gradients: one autograd node that keeps
        ``x``, ``x A^T`` and the factors, and accumulates the input gradient of the base
        and of the low-rank path in one buffer. Without: the plain kernels, the low-rank
        part added in place."""
        if self.shape.is_conv or (self.training and isinstance(self.dropout, nn.Dropout)):
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None  # autocast picks the dtypes of the matmuls; the hook path follows it
        a, b = self.A, self.B
        if a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        grad = torch.is_grad_enabled() and (
            x.requires_grad or a.requires_grad or b.requires_grad or weight.requires_grad
        )
        if grad:
            return _LoraLinear.apply(x, weight, bias, a, b, self.scaling, transposed)
        x2 = x.reshape(-1, x.shape[-1])
        wt = weight if transposed else weight.t()
        y = torch.mm(x2, wt) if bias is None else torch.addmm(bias, x2, wt)
        h = self.down(x) if self._shared is not None else F.linear(x, a)
        y.addmm_(h.reshape(-1, self.r), b.t(), alpha=self.scaling)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def update_slices(
        deltas: list, slices: list[tuple[int, int]], x: Tensor, y: Tensor
    ) -> Tensor | None:
        return update_fused_slices(deltas, slices, x, y)

    @staticmethod
    def link(attachments: list) -> None:
        """Projections of one adapter that read the same input share one ``x @ A``.

        Candidates: the slices of one fused projection, and per layer the q/k/v projections
        and the gate/up projections. Sharing is checked on every call (the same tensor
        object, unchanged), so a candidate that gets another input computes its own."""
        groups: dict[tuple, list[LoraDelta]] = {}
        for att in attachments:
            site, delta = att.site, att.delta
            if not isinstance(delta, LoraDelta) or delta.shape.is_conv or site.entry is not None:
                continue
            if site.out_slice is not None:
                key: tuple = ("fused", id(site.module))
            elif site.layer is not None and site.role in _SHARED_ROLES:
                key = (_SHARED_ROLES[site.role], site.tower, site.layer)
            else:
                continue
            groups.setdefault((*key, delta.shape.in_features), []).append(delta)
        for members in groups.values():
            if len(members) > 1:
                shared = SharedDown(members)
                for d in members:
                    d._shared = shared

    @staticmethod
    def mixed(
        deltas: list[LoraDelta], x: Tensor | None, y: Tensor, slots: Tensor, cache: dict
    ) -> Tensor | None:
        """Every adapter's LoRA on its own samples with two batched matmuls.

        Factors are padded to the largest rank and stacked, with a zero slot for samples
        without an adapter here: ``A`` ``(k+1, r, in)``, ``B·s`` ``(k+1, out, r)``; each
        sample gathers its pair. Stacks are reused while no factor changed. Without
        gradients the second matmul accumulates into ``y`` in place.
        """
        if x is None or any(d.shape.is_conv for d in deltas):
            return None
        if any(d.training and isinstance(d.dropout, nn.Dropout) for d in deltas):
            return None  # dropout differs per adapter; the per-group path applies each one
        if not torch.is_grad_enabled() and x.device.type != "cpu":
            # on a GPU kernel launches cost more than the masked columns' arithmetic; on the
            # CPU the arithmetic dominates, so the per-sample gather below is cheaper there
            out = _mixed_masked(deltas, x, y, slots, cache)
            if out is not None:
                return out
        a, b = _stacked(deltas, cache)
        n = x.shape[0]
        h = torch.bmm(x.reshape(n, -1, x.shape[-1]), a.to(x.dtype)[slots].transpose(1, 2))
        bt = b.to(y.dtype)[slots].transpose(1, 2)
        grad = torch.is_grad_enabled() and (y.requires_grad or h.requires_grad)
        y3 = _view(y, (n, -1, y.shape[-1]))
        if not grad and y3 is not None:
            y3.baddbmm_(h.to(y.dtype), bt)
            return y
        return torch.baddbmm(y.reshape(n, -1, y.shape[-1]), h.to(y.dtype), bt).reshape(y.shape)


class _LoraLinear(torch.autograd.Function):
    """``y = x W^T + b + s · (x A^T) B^T`` (``W`` stored ``(in, out)`` when ``transposed``).

    Saves ``x`` (as a view), ``h = x A^T`` and the weights: no activation copy. Backward
    runs five matmuls and adds the low-rank input gradient into the base's in place;
    gradients of the base weight and bias are computed only when they require it."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        a: Tensor,
        b: Tensor,
        scaling: float,
        transposed: bool,
    ) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        wt = weight if transposed else weight.t()
        y = torch.mm(x2, wt) if bias is None else torch.addmm(bias, x2, wt)
        h = torch.mm(x2, a.t())
        y.addmm_(h, b.t(), alpha=scaling)
        operands = _product_operands(x)
        if operands is not None:  # keep the factors autograd keeps anyway, not the product
            ctx.save_for_backward(*operands, h, weight, a, b)
        else:
            ctx.save_for_backward(x2, h, weight, a, b)
        ctx.product = operands is not None
        ctx.scaling, ctx.transposed, ctx.x_shape = scaling, transposed, x.shape
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.product:  # the input again, bit for bit: the same elementwise product
            p, q, h, weight, a, b = ctx.saved_tensors
            x2 = torch.mul(p, q).reshape(-1, p.shape[-1])
        else:
            x2, h, weight, a, b = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dy2 = dy.reshape(-1, dy.shape[-1])
        # s folded into the matmuls (beta=0: the empty input is ignored): no scaling kernels
        none = dy2.new_empty(())
        dh = torch.addmm(none, dy2, b, beta=0, alpha=s) if (need_x or need_a) else None
        dx = dw = dbias = da = db = None
        if need_x:
            dx = torch.mm(dy2, weight.t() if ctx.transposed else weight)
            dx.addmm_(dh, a)
            dx = dx.view(ctx.x_shape)
        if need_w:
            dw = torch.mm(x2.t(), dy2) if ctx.transposed else torch.mm(dy2.t(), x2)
        if need_bias and ctx.has_bias:
            dbias = dy2.sum(0)
        if need_a:
            da = torch.mm(dh.t(), x2)
        if need_b:
            db = torch.addmm(none, dy2.t(), h, beta=0, alpha=s)
        return dx, dw, dbias, da, db, None, None


def _product_operands(x: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(p, q)`` when ``x`` is the elementwise product ``p * q`` and autograd already keeps
    both factors for its own backward: the input of a gated MLP's down projection
    (``act(gate) * up``). Saving them instead of ``x`` costs one multiplication in backward
    and no activation memory."""
    if torch.compiler.is_compiling():
        return None
    fn = x.grad_fn
    if fn is None or type(fn).__name__ != "MulBackward0":
        return None
    try:
        p, q = fn._saved_self, fn._saved_other
    except RuntimeError:  # already released
        return None
    for t in (p, q):
        if not isinstance(t, Tensor) or t.shape != x.shape or t.dtype != x.dtype:
            return None
    return p, q


_SHARED_ROLES = {"attn.q": "attn_in", "attn.k": "attn_in", "attn.v": "attn_in"}
_SHARED_ROLES.update({"mlp.gate": "mlp_in", "mlp.up": "mlp_in"})


class SharedDown:
    """One ``x @ [A_1; A_2; ...]^T`` for LoRA deltas of one adapter that read the same ``x``.

    The first member called with a given input computes the projection for all of them;
    the others take their columns as long as they are called with the very same tensor
    (same object, unchanged) in the same grad mode and no ``A`` changed in between. The
    result is held only until every member has taken its part.
    """

    def __init__(self, members: list[LoraDelta], ranks: list[int] | None = None) -> None:
        self.members = members
        self.ranks = ranks if ranks is not None else [d.r for d in members]
        self.offsets = [sum(self.ranks[:i]) for i in range(len(self.ranks))]
        self._x: weakref.ref[Tensor] | None = None
        self._key: tuple = ()
        self._h: Tensor | None = None
        self._taken: set[int] = set()
        self._frozen: dict[str, tuple[tuple, Tensor]] = {}  # stacks reused without gradients

    def _reuse(self, name: str, key: tuple, build: Callable[[], Tensor]) -> Tensor:
        """``build()``, kept under ``name`` while ``key`` holds when no gradient is needed."""
        if torch.is_grad_enabled():
            return build()
        old = self._frozen.get(name)
        if old is not None and old[0] == key:
            return old[1]
        value = build()
        self._frozen[name] = (key, value)
        return value

    def stacked_a(self, dtype: torch.dtype) -> Tensor:
        """``[A_1; A_2; ...]`` ``(Σr, in)`` in ``dtype``."""
        key = (dtype, *((id(m.A), m.A._version) for m in self.members))
        return self._reuse("A", key, lambda: torch.cat([m.A for m in self.members]).to(dtype))

    def block_b(self, slices: list[tuple[int, int]], width: int, dtype: torch.dtype) -> Tensor:
        """``(width, Σr)``: member i's ``s_i B_i`` in rows ``slices[i]`` and its own
        columns, zeros elsewhere, so one matmul updates every slice of a fused output."""
        key = (dtype, width, tuple(slices), *((id(m.B), m.B._version) for m in self.members))

        def build() -> Tensor:
            first = self.members[0].B
            out = torch.zeros(width, sum(self.ranks), dtype=dtype, device=first.device)
            for m, (start, stop), off in zip(self.members, slices, self.offsets):
                out[start:stop, off : off + m.r] = m.B.to(dtype) * m.scaling
            return out

        return self._reuse("B", key, build)

    def __deepcopy__(self, memo: dict) -> SharedDown:
        # a copy shares nothing with this forward pass (the members may be half-built here)
        return SharedDown([copy.deepcopy(m, memo) for m in self.members], list(self.ranks))

    def __getstate__(self) -> dict:
        return {"members": self.members, "ranks": self.ranks}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["members"], state["ranks"])  # type: ignore[misc]

    def down(self, delta: LoraDelta, x: Tensor) -> Tensor:
        i = next(j for j, m in enumerate(self.members) if m is delta)
        key = (
            None if x.is_inference() else x._version,  # inference tensors have no counter
            x.dtype,
            torch.is_grad_enabled(),
            tuple(m.A._version for m in self.members),
        )
        h = self._h
        if (
            h is None
            or self._x is None
            or self._x() is not x
            or self._key != key
            or i in self._taken
        ):
            h = F.linear(x, self.stacked_a(x.dtype))
            self._x, self._key, self._h, self._taken = weakref.ref(x), key, h, set()
        self._taken.add(i)
        if len(self._taken) == len(self.members):
            self.clear()
        return h.narrow(-1, self.offsets[i], self.ranks[i])

    def clear(self) -> None:
        self._x, self._h, self._key, self._taken = None, None, (), set()


def update_fused_slices(
    deltas: list[LoraDelta], slices: list[tuple[int, int]], x: Tensor, y: Tensor
) -> Tensor | None:
    """All slices of a fused projection (timm ``qkv``, GPT-2 ``c_attn``, MHA ``in_proj``)
    in two matmuls, without gradients: ``h = x [A_1; ...]^T`` and ``y += h B_block^T``
    into ``y`` itself. ``None`` unless ``deltas`` are exactly one shared group."""
    shared = deltas[0]._shared
    if (
        shared is None
        or torch.is_grad_enabled()
        or len(shared.members) != len(deltas)
        or any(d.training and isinstance(d.dropout, nn.Dropout) for d in deltas)
    ):
        return None
    where = {id(d): sl for d, sl in zip(deltas, slices)}
    if any(id(m) not in where for m in shared.members):
        return None
    slices = [where[id(m)] for m in shared.members]  # in the group's column order
    width = y.shape[-1]
    y2 = _view(y, (-1, width))
    if y2 is None:
        return None
    h = F.linear(x, shared.stacked_a(x.dtype)).reshape(-1, sum(shared.ranks))
    y2.addmm_(h.to(y.dtype), shared.block_b(slices, width, y.dtype).t())
    return y


def _view(t: Tensor, shape: tuple[int, ...]) -> Tensor | None:
    """``t.view(shape)`` when that is possible without a copy, else ``None``."""
    try:
        return t.view(shape)
    except RuntimeError:
        return None


def add_low_rank(
    y: Tensor, h: Tensor, B: Tensor, scaling: float, *, inplace: bool = False
) -> Tensor:
    """``y + scaling · h B^T`` as one fused multiply-add (``addmm``).

    ``inplace`` writes into ``y`` (and returns it) when ``y`` can be viewed as a matrix;
    only for callers that own ``y`` and need no gradient through it. Autograd's ``addmm``
    keeps only ``h`` and ``B`` for backward and folds ``scaling`` into the small matmuls.
    """
    out_features = y.shape[-1]
    h2 = h.reshape(-1, h.shape[-1]).to(y.dtype)
    bt = B.to(y.dtype).t()
    if inplace:
        y2 = _view(y, (-1, out_features))
        if y2 is not None:
            y2.addmm_(h2, bt, alpha=scaling)
            return y
    return torch.addmm(y.reshape(-1, out_features), h2, bt, alpha=scaling).view(y.shape)


def _mixed_masked(
    deltas: list[LoraDelta], x: Tensor, y: Tensor, slots: Tensor, cache: dict
) -> Tensor | None:
    """A mixed batch without gradients in three kernels and no per-sample gather: every
    adapter's ``x A_j^T`` at once (``(…, Σr)``), the columns of other adapters zeroed per
    sample, and one ``addmm_`` with every ``s_j B_j`` side by side. Used on GPUs while
    ``Σr`` is small (the zeroed columns are wasted work)."""
    total = sum(d.r for d in deltas)
    width = y.shape[-1]
    n = x.shape[0]
    y2 = _view(y, (-1, width))
    if total > 512 or y2 is None or y.shape[0] != n:
        return None
    key = tuple((id(d.A), d.A._version, id(d.B), d.B._version) for d in deltas)
    stack = cache.get("masked")
    if stack is None or stack[0] != key or stack[1].dtype != x.dtype:
        a = torch.cat([d.A for d in deltas]).to(x.dtype)
        b = torch.cat([d.B * d.scaling for d in deltas], dim=1).to(y.dtype)
        owner = torch.repeat_interleave(
            torch.arange(len(deltas), device=slots.device),
            torch.tensor([d.r for d in deltas], device=slots.device),
        )
        stack = cache["masked"] = (key, a, b, owner, {})
    _, a, b, owner, masks = stack
    ref = masks.get("slots")
    if ref is None or ref[0]() is not slots:  # one mask per routing (the model keeps those)
        masks["slots"] = (weakref.ref(slots), (slots.unsqueeze(1) == owner).to(x.dtype))
    mask = masks["slots"][1]
    h = F.linear(x, a).view(n, -1, total)
    h.mul_(mask.unsqueeze(1))
    y2.addmm_(h.view(-1, total).to(y.dtype), b.t())
    return y


def _stacked(deltas: list[LoraDelta], cache: dict) -> tuple[Tensor, Tensor]:
    # the key holds the deltas themselves (not their ids, which Python may reuse) and the
    # version counters that every in-place update of a factor bumps
    key = [(d, d.A._version, d.B._version) for d in deltas]
    grad = torch.is_grad_enabled() and any(d.A.requires_grad for d in deltas)
    old = cache.get("lora_key")
    if not grad and old is not None and len(old) == len(key):
        if all(o[0] is k[0] and o[1:] == k[1:] for o, k in zip(old, key)):
            return cache["lora_A"], cache["lora_B"]
    r = max(d.r for d in deltas)
    a = torch.stack([F.pad(d.A, (0, 0, 0, r - d.r)) for d in deltas])
    b = torch.stack([F.pad(d.B * d.scaling, (0, r - d.r)) for d in deltas])
    a = torch.cat([a, a.new_zeros(1, *a.shape[1:])])  # the slot of samples without one here
    b = torch.cat([b, b.new_zeros(1, *b.shape[1:])])
    if not grad:
        cache.update(lora_key=key, lora_A=a, lora_B=b)
    return a, b


def _build(cfg: LoraConfig, site: Site) -> LoraDelta:
    return LoraDelta(
        ProjectionShape.of(site), cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.init
    )


def _count(cfg: LoraConfig, site: Site) -> int:
    shape = ProjectionShape.of(site)
    return cfg.r * (shape.in_features * math.prod(shape.kernel_size) + shape.out_features)


METHOD = Method(
    id="lora",
    family="reparameterized",
    config=LoraConfig,
    build=_build,
    num_parameters=_count,
    formula="r · (d_in · k + d_out) per projection (k: kernel elements, 1 for Linear)",
    site_kinds=("projection",),
    default_targets=("attn.q", "attn.v"),
    budget_field="r",
    mergeable=True,
    identity_at_init=True,
    paper="Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, 2021, arXiv:2106.09685",
    summary="low-rank update of projection weights; mergeable",
)
