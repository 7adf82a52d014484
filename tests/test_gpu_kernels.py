"""The fused projection nodes on CUDA (float32 and bfloat16, cuBLAS underneath), against the
same arithmetic as separate torch operations, and a LoRA / DoRA model trained one step
through them against the same model on the plain path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import unipeft
from unipeft.blocks.fused import dora_linear, lora_linear

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _leaves(dtype: torch.dtype, product: bool) -> dict:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, generator=g) * scale
        return t.to("cuda", dtype).requires_grad_(True)

    leaves = {"gate": rnd(4, 64, 256), "up": rnd(4, 64, 256)} if product else {"x": rnd(4, 64, 256)}
    leaves.update(
        weight=rnd(384, 256, scale=0.05),
        bias=rnd(384),
        a=rnd(16, 256, scale=0.05),
        b=rnd(384, 16, scale=0.05),
        gain=(torch.rand(384, generator=g) + 0.5).to("cuda").requires_grad_(True),
    )
    return leaves


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("product", [False, True])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fused_node_on_cuda(dtype: torch.dtype, product: bool, kind: str) -> None:
    outs = []
    for fused in (True, False):
        lv = _leaves(dtype, product)
        x = lv["x"] if "x" in lv else F.silu(lv["gate"]) * lv["up"]
        w, bias, a, b, gain = lv["weight"], lv["bias"], lv["a"], lv["b"], lv["gain"]
        if fused:
            y = (
                lora_linear(x, w, bias, a, b, 0.5)
                if kind == "lora"
                else dora_linear(x, w, bias, a, b, gain, 0.5)
            )
        else:
            z = F.linear(x, w) + 0.5 * F.linear(F.linear(x, a), b)
            y = (z * gain.to(dtype) if kind == "dora" else z) + bias
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
        keys = sorted(k for k in lv if kind == "dora" or k != "gain")
        grads = torch.autograd.grad(y, [lv[k] for k in keys], dy)
        outs.append((y, dict(zip(keys, grads))))
    tol = {"atol": 2e-4, "rtol": 2e-4} if dtype == torch.float32 else {"atol": 0.06, "rtol": 0.03}
    torch.testing.assert_close(outs[0][0], outs[1][0], **tol)
    for k, g in outs[0][1].items():
        torch.testing.assert_close(g.float(), outs[1][1][k].float(), **tol, msg=k)


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_step_fused_matches_plain(method: str, dtype: torch.dtype) -> None:
    """One training step of a Llama through the fused nodes equals the same step with the
    fused path declined (the hook path), on every adapter gradient."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )  # fmt: skip
    base = LlamaForCausalLM(cfg).to("cuda", dtype)
    ids = torch.randint(0, 128, (2, 32), device="cuda")
    targets = ["attn.q", "attn.k", "attn.v", "attn.out", "mlp.gate", "mlp.up", "mlp.down"]
    grads = []
    for declined in (False, True):
        torch.manual_seed(1)
        model = unipeft.apply(copy.deepcopy(base), method, r=8, alpha=16, targets=targets)
        torch.manual_seed(1)
        for n, p in model.named_parameters():
            if p.requires_grad and n.endswith("B"):
                p.data.normal_(0, 0.05)
        if declined:
            for att in model.adapters["default"].attachments:
                att.delta.fused_linear = lambda *a, **k: None  # type: ignore[method-assign]
        model(input_ids=ids).logits.float().pow(2).mean().backward()
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad})
    tol = {"atol": 1e-4, "rtol": 1e-3} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.05}
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], **tol, msg=n)
