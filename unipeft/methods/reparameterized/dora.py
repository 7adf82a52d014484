"""DoRA: a LoRA update with the weight's row norms replaced by a learned magnitude.

Liu et al., 2024. The adapted weight of a projection is

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖        (one norm per output channel: its row of W,
                                                over the input and kernel dimensions)

with ``m`` ``(out,)`` initialised to ``‖W‖`` and ``B`` to zero, so the adapter starts as the
identity. As in the paper (§4.3) the norm is treated as a constant in backward.

The norm is computed without forming ``B A`` (``out × in``): for row ``i``,

    ‖W_i + s(BA)_i‖² = ‖W_i‖² + Σ_k B_ik (2s·(W Aᵀ)_ik + s²·(B (A Aᵀ))_ik)

which reads ``W`` once per call for ``W Aᵀ`` (``out × r``) and costs ``O(out · r²)`` more,
in float32 (or the weight's dtype when wider). ``‖W_i‖²`` of the frozen weight is cached
while the backbone parameter's version counter is unchanged; in-place updates move it, and
the merge ledger, which writes through ``.data``, bumps it explicitly, so the norm follows
the weight as it is stored, other adapters merged into it included. (Writes a user makes
through ``.data`` are invisible to any version counter: call
``torch.autograd.graph.increment_version`` on the parameter after them.)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ...blocks import LowRankConfig, LowRankDelta, low_rank_parameters, low_rank_refusal
from ...blocks.fused import dora_linear
from ...contract.deltas import ProjectionShape
from ...contract.fastpath import FastPathParts
from ...contract.method import Method
from ...contract.sites import ModuleSite, Site, weight_codec
from . import dora_mixed


class DoraConfig(LowRankConfig):
    init: Literal["kaiming", "gaussian", "orthogonal"] = Field(
        "kaiming",
        description="init of A; B starts at zero and the magnitude at the weight's row norms, "
        "so the adapter is the identity at init",
    )


class DoraDelta(LowRankDelta, FastPathParts):
    """``g ⊙ (y - b + s · B A dropout(x)) + b`` with ``g = m / ‖W + s·B A‖`` (detached norm).

    ``A``: ``(r, in, *kernel)``, ``B``: ``(out, r)``, ``magnitude``: ``(out,)``. The base
    weight and bias are read through the site (a plain attribute, so the state dict holds
    only the three parameters).
    """

    def __init__(
        self,
        site: ModuleSite,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
    ) -> None:
        super().__init__(ProjectionShape.of(site), r, alpha, dropout, use_rslora, init)
        self.site = site  # not a module, parameter or buffer: nothing of it is saved
        shape = self.shape
        weight, _ = self.base()
        if weight.shape[0] != shape.out_features:
            raise ValueError(
                f"site {site.name!r}: its weight has {weight.shape[0]} output rows but the "
                f"site's output has {shape.out_features} channels"
            )
        with torch.no_grad():  # B = 0: the norm is the weight's own (A is not needed)
            norm = _finish(_row_squares(weight.reshape(weight.shape[0], -1)))
        self.magnitude = nn.Parameter(norm.to(weight.dtype))

    # ------------------------------------------------------------------ the base weight

    def base(self) -> tuple[Tensor, Tensor | None]:
        """The site's frozen ``(weight, bias)``: canonical ``(out, in, *kernel)`` views of the
        backbone's live tensors, restricted to the site's slice."""
        return self.site.weight_views()

    @torch.no_grad()
    def _live_squares(self, weight: Tensor) -> Tensor:
        """``‖W_i‖²`` of the site's live weight, cached while the backbone's parameter is
        unchanged: its version counter moves with every in-place update (optimizer steps,
        ``load_state_dict``, and unipeft's merges, which bump it explicitly)."""
        if torch.compiler.is_compiling():  # a traced graph recomputes it; no Python cache
            return _row_squares(weight.reshape(weight.shape[0], -1))
        param = self.site.parameter("weight")
        assert param is not None
        if weight_codec(param, self.site.module) is not None:  # a fresh dequantized copy
            return _row_squares(weight.reshape(weight.shape[0], -1))
        key = (param.data_ptr(), param._version, weight.data_ptr(), tuple(weight.shape))
        cached = self.__dict__.get("_squares")
        if cached is not None and cached[0] == key:
            return cached[1]
        squares = _row_squares(weight.reshape(weight.shape[0], -1))
        self.__dict__["_squares"] = (key, squares)
        return squares

    @torch.no_grad()
    def weight_norm(self, weight: Tensor, squares: Tensor | None = None) -> Tensor:
        """``‖W_i + s(BA)_i‖`` for every output channel ``i`` of ``weight``, without forming
        ``B A``. Float32, or the weight's dtype when wider; never tracked by autograd.
        ``squares``: ``‖W_i‖²`` when already known."""
        out = weight.shape[0]
        dtype = torch.promote_types(weight.dtype, torch.float32)
        w = weight.reshape(out, -1)
        a = self.A.detach().reshape(self.r, -1)
        b = self.B.detach().to(dtype)
        if w.dtype == dtype:
            wa = w @ a.to(dtype).t()
        elif w.is_cuda:  # half-precision weight: accumulate and return in float32, no copy of W
            wa = torch.mm(w, a.to(w.dtype).t(), out_dtype=dtype)
        else:
            wa = w.to(dtype) @ a.to(dtype).t()
        a = a.to(dtype)
        s = self.scaling
        # t = 2s·W Aᵀ + s²·B (A Aᵀ);  ‖·‖² = ‖W_i‖² + Σ_k B_ik t_ik
        t = torch.addmm(wa, b, a @ a.t(), beta=2.0 * s, alpha=s * s)
        base = _row_squares(w) if squares is None else squares.clone()
        return _finish(base.add_(torch.linalg.vecdot(t, b)))

    def _gain(self, weight: Tensor, live: bool = False) -> Tensor:
        """``g = m / ‖W + s·B A‖`` ``(out,)`` in float32 (or wider): differentiable in ``m``
        only. ``live``: ``weight`` is the site's own, whose ``‖W‖²`` is cached."""
        norm = self.weight_norm(weight, self._live_squares(weight) if live else None)
        return self.magnitude.to(norm.dtype) / norm

    # ------------------------------------------------------------------ forward / merge

    def forward(self, x: Tensor | None, y: Tensor) -> Tensor:
        assert x is not None
        weight, bias = self.base()
        g = self._gain(weight, live=True).to(y.dtype)
        h = self.dropout(x)
        a = self.A.to(h.dtype)
        b = self.B.to(h.dtype)
        if self.shape.is_conv:
            k = len(self.shape.kernel_size)
            u = self.shape.project(h, a)
            up = (F.conv1d, F.conv2d, F.conv3d)[k - 1](u, b.reshape(*b.shape, *([1] * k)))
            z = torch.add(y, up.to(y.dtype), alpha=self.scaling)
            g = g.reshape(-1, *([1] * k))  # channels are dim 1: (out, 1, ..., 1) broadcasts
        else:
            u = F.linear(h, a).reshape(-1, self.r)
            # y + s·(x Aᵀ) Bᵀ in one kernel; y (possibly a slice of a fused output) is read
            # in place and never modified
            z = torch.addmm(
                y.reshape(-1, y.shape[-1]), u.to(y.dtype), b.t().to(y.dtype), alpha=self.scaling
            ).reshape(y.shape)
        if bias is None:
            return z * g
        # g ⊙ (z - b) + b  =  z ⊙ g + (1 - g) ⊙ b: one fused kernel on the big tensor
        c = torch.addcmul(bias.to(y.dtype), g.reshape(-1), bias.to(y.dtype), value=-1.0)
        return torch.addcmul(c.reshape(g.shape), z, g)

    def _adapted(self, weight: Tensor) -> Tensor:
        """``g ⊙ (W + s·B A)`` ``(out, in·k)`` for ``weight``, in float32 (or wider)."""
        g = self._gain(weight)
        dtype = g.dtype
        ba = self.B.detach().to(dtype) @ self.A.detach().to(dtype).reshape(self.r, -1)
        w = torch.add(weight.reshape(weight.shape[0], -1).to(dtype), ba, alpha=self.scaling)
        return w.mul_(g.detach()[:, None])

    def merged(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(g ⊙ (W + s·B A), b)`` for the ``weight`` given (the norm is that weight's)."""
        with torch.no_grad():
            new = self._adapted(weight)
        return new.reshape(weight.shape).to(weight.dtype), bias

    def delta_weight(self) -> Tensor:
        """``W' - W`` ``(out, in, *kernel)`` for the site's current weight, in the dtype of the
        parameters. Read it while the adapter is not merged: merged, the weight already holds
        ``W'``."""
        weight, _ = self.base()
        with torch.no_grad():
            new = self._adapted(weight)
            delta = new.sub_(weight.reshape(weight.shape[0], -1).to(new.dtype))
        return delta.reshape(weight.shape).to(self.A.dtype)

    # ------------------------------------------------------------------ FastPath
    # A single DoRA on a Linear runs as one fused node (:meth:`fused_linear`); mixed batches
    # have their own kernels (:mod:`.dora_mixed`); the other hooks run the plain forward.

    def fused_linear(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool
    ) -> Tensor | None:
        """The site's whole output ``g ⊙ (x W^T + s · x A^T B^T) + b`` as one autograd node
        (:func:`unipeft.blocks.dora_linear`): no separate low-rank output, gain product or
        bias pass in forward or backward. Declined where the plain path must run: GPT-2
        ``Conv1D`` weights, dropout, quantized weights, autocast."""
        if transposed or self.shape.is_conv or self.drops:
            return None
        if not weight.is_floating_point() or weight_codec(weight) is not None:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        g = self._gain(weight, live=True)
        a, b = self.A.to(x.dtype), self.B.to(x.dtype)
        if torch.is_grad_enabled():
            return dora_linear(x, weight, bias, a, b, g, self.scaling)
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.mm(x2, weight.t())
        y.addmm_(torch.mm(x2, a.t()), b.t(), alpha=self.scaling)
        y.mul_(g.to(y.dtype))
        if bias is not None:
            y.add_(bias.to(y.dtype))
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def mixed(
        deltas: list, x: Tensor | None, y: Tensor, slots: Tensor, cache: dict
    ) -> Tensor | None:
        return dora_mixed.mixed_batch(deltas, x, y, slots, cache)


def _row_squares(w: Tensor) -> Tensor:
    """``‖w_i‖²`` of every row of ``w`` ``(out, n)``, accumulated in float32 or wider."""
    dtype = torch.promote_types(w.dtype, torch.float32)
    return torch.linalg.vector_norm(w, dim=1, dtype=dtype).square_()


def _finish(squares: Tensor) -> Tensor:
    """Norms from squared norms; a row that is exactly zero gets a tiny norm, not 0/0."""
    return squares.clamp_min_(torch.finfo(squares.dtype).tiny).sqrt_()


def _build(cfg: DoraConfig, site: Site) -> DoraDelta:
    assert isinstance(site, ModuleSite)
    delta = DoraDelta(site, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.init)
    delta.lr_ratio = cfg.loraplus_lr_ratio
    return delta


def _count(cfg: DoraConfig, site: Site) -> int:
    return low_rank_parameters(cfg.r, site) + ProjectionShape.of(site).out_features  # type: ignore[arg-type]


def _rank_fits(cfg: DoraConfig, site: Site) -> str | None:
    return low_rank_refusal("r", cfg.r, site)


METHOD = Method(
    id="dora",
    refuses="r above min(d_in · k, d_out) of a site",
    family="reparameterized",
    config=DoraConfig,
    build=_build,
    num_parameters=_count,
    formula="r · (d_in · k + d_out) + d_out per projection (k: kernel elements, 1 for Linear)",
    site_kinds=("projection",),
    default_targets=("attn.q", "attn.v"),
    budget_field="r",
    mergeable=True,
    identity_at_init=True,
    paper="Liu et al., DoRA: Weight-Decomposed Low-Rank Adaptation, 2024, arXiv:2402.09353",
    summary="LoRA on the direction of each weight row plus a learned magnitude; mergeable",
    size_check=_rank_fits,
)
