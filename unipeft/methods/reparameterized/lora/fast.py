"""LoRA's fast paths: the kernels behind :class:`LoraDelta`'s
:class:`~unipeft.contract.fastpath.FastPath` methods.

- :class:`SharedDown`: one ``x @ [A_1; A_2; ...]^T`` for the projections of one adapter
  that read the same input;
- :func:`update_fused_slices`: every slice of a fused projection in two matmuls;

Mixed batches (one adapter per sample) live in :mod:`.mixed`. Each is checked against the
plain path in ``tests/test_fast_paths.py``.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .delta import LoraDelta


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
    in two matmuls: ``h = x [A_1; ...]^T`` and ``y + h B_block^T``, where ``B_block``
    ``(width, Σr)`` holds member i's ``s_i B_i`` in its output rows and its own columns.
    Without gradients the update goes into ``y`` itself. With gradients it is one
    ``addmm`` node over the whole output: backward gets ``dh`` for every member from one
    matmul and passes ``dY`` to the base whole, with no per-slice narrowing, zero-filling
    or concatenation. ``None`` unless ``deltas`` are exactly one shared group."""
    shared = deltas[0]._shared
    if shared is None or len(shared.members) != len(deltas) or any(d.drops for d in deltas):
        return None
    where = {id(d): sl for d, sl in zip(deltas, slices)}
    if any(id(m) not in where for m in shared.members):
        return None
    slices = [where[id(m)] for m in shared.members]  # in the group's column order
    width = y.shape[-1]
    if torch.is_grad_enabled():
        return _slices_with_grad(shared, slices, x, y)
    y2 = _view(y, (-1, width))
    if y2 is None:
        return None
    h = F.linear(x, shared.stacked_a(x.dtype)).reshape(-1, sum(shared.ranks))
    y2.addmm_(h.to(y.dtype), shared.block_b(slices, width, y.dtype).t())
    return y


def _slices_with_grad(
    shared: SharedDown, slices: list[tuple[int, int]], x: Tensor, y: Tensor
) -> Tensor:
    members, width, total = shared.members, y.shape[-1], sum(shared.ranks)
    a = torch.cat([m.A for m in members]).to(x.dtype)
    h = F.linear(x, a).reshape(-1, total).to(y.dtype)
    common = len({m.scaling for m in members}) == 1  # one adapter: usually one scaling
    alpha = members[0].scaling if common else 1.0  # folded into the addmm when shared
    bs = [m.B.to(y.dtype) if common else m.B.to(y.dtype) * m.scaling for m in members]
    order = sorted(range(len(members)), key=lambda i: slices[i][0])
    tiles = [slices[i] for i in order]
    contiguous = tiles[0][0] == 0 and tiles[-1][1] == width
    contiguous = contiguous and all(p[1] == q[0] for p, q in itertools.pairwise(tiles))
    if contiguous and order == list(range(len(members))):
        block = torch.block_diag(*bs)  # every output row belongs to one member, in order
    else:
        rows: list[Tensor] = []
        pos = 0
        for i in order:
            start, stop = slices[i]
            if start > pos:
                rows.append(bs[i].new_zeros(start - pos, total))
            off = shared.offsets[i]
            rows.append(F.pad(bs[i], (off, total - off - shared.ranks[i])))
            pos = stop
        if pos < width:
            rows.append(bs[0].new_zeros(width - pos, total))
        block = torch.cat(rows)
    out = torch.addmm(y.reshape(-1, width), h, block.t(), alpha=alpha)
    return out.view(y.shape)


def _view(t: Tensor, shape: tuple[int, ...]) -> Tensor | None:
    """``t.view(shape)`` when that is possible without a copy, else ``None``."""
    try:
        return t.view(shape)
    except RuntimeError:
        return None


def link_shared(attachments: list[Any]) -> None:
    """Give LoRA deltas of one adapter that read the same input one :class:`SharedDown`.

    Candidates: the slices of one fused projection, and per layer the q/k/v projections
    and the gate/up projections. Sharing is checked on every call (the same tensor
    object, unchanged), so a candidate that gets another input computes its own."""
    groups: dict[tuple, list[LoraDelta]] = {}
    for att in attachments:
        site, delta = att.site, att.delta
        if delta.shape.is_conv or site.entry is not None:
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
