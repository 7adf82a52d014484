"""Fused autograd nodes for a projection and its low-rank update, public so that a plugin of
the LoRA family gets the kernels the built-ins use.

- :func:`lora_linear`: ``y = x W^T + b + s · (x A^T) B^T`` as one node (LoRA);
- :func:`dora_linear`: ``y = g ⊙ (x W^T + s · (x A^T) B^T) + b`` as one node (DoRA, with
  ``g = m / ‖W + s B A‖`` computed by the caller and differentiated by autograd).

What one node buys over the same arithmetic as separate autograd operations:

- the low-rank update is added into the base GEMM's output in place (no second output
  tensor, no separate ``add`` in forward or backward);
- backward computes the input gradient of the base and of the low-rank path into one
  buffer (``dx = dY W``, then ``dx += (s dY B) A`` in place), the scaling ``s`` folded
  into the skinny GEMMs (no scaling kernels), and only the gradients that are needed;
- nothing is saved beyond what autograd keeps anyway: ``x`` (or, for the input of a gated
  MLP's down projection ``act(gate) * up``, a reference to the multiplication whose own
  backward keeps both factors: ``x`` is rebuilt from them in backward, so the product is
  never kept) and ``h = x A^T`` (``n × r``).

Both nodes are checked against the plain composition of torch operations, values and
every gradient, in ``tests/test_fused_nodes.py`` (CPU, float64 and bfloat16) and
``tests/test_gpu_kernels.py`` (CUDA, float32 and bfloat16).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["dora_linear", "lora_linear"]


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    a: Tensor,
    b: Tensor,
    scaling: float,
    transposed: bool = False,
) -> Tensor:
    """``x W^T + b + scaling · (x A^T) B^T`` with one autograd node.

    ``weight``: ``(out, in)``, or ``(in, out)`` when ``transposed`` (GPT-2's ``Conv1D``);
    ``a``: ``(r, in)``; ``b``: ``(out, r)``; every tensor in ``x``'s dtype."""
    return _LowRankLinear.apply(x, weight, bias, a, b, None, scaling, transposed)


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    a: Tensor,
    b: Tensor,
    gain: Tensor,
    scaling: float,
) -> Tensor:
    """``gain ⊙ (x W^T + scaling · (x A^T) B^T) + b`` with one autograd node.

    ``gain`` ``(out,)`` is DoRA's ``m / ‖W + s B A‖`` (any floating dtype; its gradient is
    returned in that dtype, so autograd carries it on to the magnitude). The node keeps
    the pre-gain output ``z`` for ``∂/∂gain = Σ_tokens dY ⊙ z``: the same one activation a
    separate multiplication would keep."""
    return _LowRankLinear.apply(x, weight, bias, a, b, gain, scaling, False)


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        a: Tensor,
        b: Tensor,
        gain: Tensor | None,
        scaling: float,
        transposed: bool,
    ) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        wt = weight if transposed else weight.t()
        small_first = x.device.type == "cpu"
        h = torch.mm(a, x2.t()).t() if small_first else torch.mm(x2, a.t())
        z: Tensor | None = None
        if gain is None:
            y = torch.mm(x2, wt) if bias is None else torch.addmm(bias, x2, wt)
            y.addmm_(h, b.t(), alpha=scaling)
        else:
            z = torch.mm(x2, wt)
            z.addmm_(h, b.t(), alpha=scaling)
            g = gain.to(z.dtype)
            y = z * g if bias is None else torch.addcmul(bias.to(z.dtype), z, g)
        product = _product_node(x)
        saved = [h, weight, a, b]
        if product is None:
            saved.insert(0, x2)
        if gain is not None:
            saved += [gain, z]
        ctx.save_for_backward(*saved)
        ctx.product = product  # the multiplication node whose factors rebuild x
        ctx.scaling, ctx.transposed, ctx.x_shape = scaling, transposed, x.shape
        ctx.has_bias, ctx.has_gain = bias is not None, gain is not None
        ctx.small_first = small_first
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        if ctx.product is not None:
            x2 = _rebuild(ctx.product, ctx.x_shape)
        else:
            x2 = saved.pop(0)
        h, weight, a, b = saved[:4]
        s = ctx.scaling
        need_x, need_w, need_bias, need_a, need_b, need_g = ctx.needs_input_grad[:6]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dbias = dy2.sum(0) if need_bias and ctx.has_bias else None
        dgain = None
        if ctx.has_gain:
            gain, z = saved[4:6]
            if need_g:  # Σ_tokens dY ⊙ z, accumulated in float32 (or wider)
                acc = torch.promote_types(torch.promote_types(gain.dtype, dy2.dtype), torch.float32)
                dgain = torch.linalg.vecdot(dy2.to(acc), z.to(acc), dim=0).to(gain.dtype)
            dy2 = dy2 * gain.to(dy2.dtype)  # the gradient at z
        # s folded into the skinny matmuls (beta=0: the empty input is ignored). On the CPU
        # the skinny products are computed with the rank as their first dimension
        # (``dh^T = B^T dY^T``, ``dB^T = h^T dY``) and used transposed: BLAS runs those
        # several times faster there than the same products with ``r`` columns.
        none = dy2.new_empty(())
        small_first = ctx.small_first
        dh: Tensor | None = None
        if need_x or need_a:
            if small_first:
                dh = torch.addmm(none, b.t(), dy2.t(), beta=0, alpha=s).t()
            else:
                dh = torch.addmm(none, dy2, b, beta=0, alpha=s)
        dx = dw = da = db = None
        if need_x:
            dx = torch.mm(dy2, weight.t() if ctx.transposed else weight)
            dx.addmm_(dh, a)
            dx = dx.view(ctx.x_shape)
        if need_w:
            dw = torch.mm(x2.t(), dy2) if ctx.transposed else torch.mm(dy2.t(), x2)
        if need_a:
            da = torch.mm(dh.t(), x2)  # type: ignore[union-attr]
        if need_b:
            if small_first:
                db = torch.addmm(none, h.t(), dy2, beta=0, alpha=s).t()
            else:
                db = torch.addmm(none, dy2.t(), h, beta=0, alpha=s)
        return dx, dw, dbias, da, db, dgain, None, None


def _product_node(x: Tensor) -> Any:
    """The autograd node of ``x = p * q`` when that multiplication keeps both factors, in
    ``x``'s shape and dtype, for its own backward (the input of a gated MLP's down
    projection, ``act(gate) * up``); else ``None``. Only the node is referenced: its saved
    factors are read in backward, which runs before the multiplication's own."""
    if torch.compiler.is_compiling():
        return None
    fn = x.grad_fn
    if fn is None or type(fn).__name__ != "MulBackward0":
        return None
    try:
        p, q = fn._saved_self, fn._saved_other
    except RuntimeError:  # already released, or a factor changed in place since
        return None
    for t in (p, q):
        if not isinstance(t, Tensor) or t.shape != x.shape or t.dtype != x.dtype:
            return None
    return fn


def _rebuild(fn: Any, shape: torch.Size) -> Tensor:
    """``x = p * q`` again, bit for bit, from the multiplication node's saved factors."""
    p, q = fn._saved_self, fn._saved_other
    return torch.mul(p, q).reshape(-1, shape[-1])
