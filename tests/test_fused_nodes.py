"""The fused projection nodes of :mod:`unipeft.blocks.fused` against the same arithmetic as
separate torch operations: outputs and every gradient, in float64 (exact to rounding) and
bfloat16, with and without bias, on a plain input and on a gated-MLP product input (whose
factors the node reads back in backward instead of keeping the product)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unipeft.blocks.fused import dora_linear, lora_linear


def _inputs(dtype: torch.dtype, product: bool, bias: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_(True)

    n_in, n_out, r = 24, 20, 4
    if product:
        gate, up = rnd(2, 5, n_in), rnd(2, 5, n_in)
        leaves = {"gate": gate, "up": up}
    else:
        leaves = {"x": rnd(2, 5, n_in)}
    leaves.update(
        weight=rnd(n_out, n_in, scale=0.2),
        a=rnd(r, n_in, scale=0.3),
        b=rnd(n_out, r, scale=0.3),
        gain=(torch.rand(n_out, generator=g) + 0.5).to(torch.float32).requires_grad_(True),
    )
    if bias:
        leaves["bias"] = rnd(n_out)
    return leaves


def _x(leaves: dict) -> torch.Tensor:
    if "x" in leaves:
        return leaves["x"]
    return F.silu(leaves["gate"]) * leaves["up"]


def _grads(leaves: dict, out: torch.Tensor, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(out.shape, generator=g).to(out.dtype)
    keys = sorted(leaves)
    grads = torch.autograd.grad(out, [leaves[k] for k in keys], dy, allow_unused=True)
    return dict(zip(keys, grads))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("product", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fused_node_matches_plain_ops(
    dtype: torch.dtype, product: bool, bias: bool, kind: str
) -> None:
    s = 0.75
    results = []
    for fused in (True, False):
        leaves = _inputs(dtype, product, bias)
        x = _x(leaves)
        w, a, b = leaves["weight"], leaves["a"], leaves["b"]
        bias_t = leaves.get("bias")
        gain = leaves["gain"]
        if fused:
            out = (
                lora_linear(x, w, bias_t, a, b, s)
                if kind == "lora"
                else dora_linear(x, w, bias_t, a, b, gain, s)
            )
        else:
            z = F.linear(x, w) + s * F.linear(F.linear(x, a), b)
            if kind == "dora":
                z = z * gain.to(dtype)
            out = z if bias_t is None else z + bias_t
        grads = _grads(leaves, out)
        if kind == "lora":
            assert grads["gain"] is None
        results.append((out, grads))
    (out_f, g_f), (out_p, g_p) = results
    tol = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 0.1, "rtol": 0.05}
    torch.testing.assert_close(out_f, out_p, **tol)
    assert set(g_f) == set(g_p)
    for k in g_f:
        if g_p[k] is None:
            assert g_f[k] is None, k
            continue
        assert g_f[k] is not None, k
        assert g_f[k].dtype == g_p[k].dtype, k
        torch.testing.assert_close(g_f[k].float(), g_p[k].float(), **tol, msg=k)


def test_product_input_is_not_kept() -> None:
    """On a gated-MLP product the node keeps no tensor of the product's size beyond what the
    multiplication itself keeps (its two factors): the product is rebuilt in backward."""
    leaves = _inputs(torch.float64, product=True, bias=False)
    x = _x(leaves)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_linear(x, leaves["weight"], None, leaves["a"], leaves["b"], 0.5)
    assert not any(t.data_ptr() == x.data_ptr() for t in saved)
    assert all(t.numel() < x.numel() or t is leaves["weight"] for t in saved)


def test_only_needed_gradients_are_computed() -> None:
    leaves = _inputs(torch.float64, product=False, bias=True)
    leaves["weight"].requires_grad_(False)
    leaves["bias"].requires_grad_(False)
    x = leaves["x"]
    out = lora_linear(x, leaves["weight"], leaves["bias"], leaves["a"], leaves["b"], 0.5)
    fn = out.grad_fn
    assert fn is not None and fn.next_functions[1][0] is None  # no edge to the frozen weight
    ga, gb = torch.autograd.grad(out.sum(), [leaves["a"], leaves["b"]])
    ref_out = F.linear(x, leaves["weight"], leaves["bias"]) + 0.5 * F.linear(
        F.linear(x, leaves["a"]), leaves["b"]
    )
    ra, rb = torch.autograd.grad(ref_out.sum(), [leaves["a"], leaves["b"]])
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gb, rb)
