"""MixLoRA: top-k routed LoRA experts at the FFN projections, one LoRA at attention, and the
load-balancing loss; checked against the formula computed from the delta's own tensors."""

from __future__ import annotations

import pytest
import torch

import unipeft
from unipeft import ConfigError, TargetError
from unipeft.blocks import LowRankDelta, load_balancing_loss
from unipeft.methods.moe.moe import MoeDelta


def _model(name: str = "llama", **cfg):
    bb = unipeft.registry().tiny_backbone(name)
    model = unipeft.apply(bb.make(), "mixlora", r=2, **cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.deltas.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return bb, model


def test_routed_ffn_and_plain_attention() -> None:
    _, model = _model(num_experts=4, top_k=2)
    adapter = model.adapters["default"]
    kinds = {s.role: type(adapter.delta_at(s)).__name__ for s in adapter.sites}
    assert kinds == {
        "attn.q": "LowRankDelta", "attn.k": "LowRankDelta", "attn.v": "LowRankDelta",
        "attn.out": "LowRankDelta", "mlp.up": "MoeDelta", "mlp.gate": "MoeDelta",
        "mlp.down": "MoeDelta",
    }  # fmt: skip
    method = unipeft.get_method("mixlora")
    assert model.num_trainable_parameters() == sum(
        method.num_parameters(adapter.config, s) for s in adapter.sites
    )
    # y' = y + Σ_i g_i s B_i A_i x with g the renormalised top-2 of softmax(W_r x)
    delta = adapter.delta_at("layers.0:mlp.up")
    assert isinstance(delta, MoeDelta)
    x, y = torch.randn(2, 3, 32), torch.randn(2, 3, 64)
    p = torch.softmax(x @ delta.router.weight.t(), -1)
    top, idx = p.topk(2, -1)
    g = torch.zeros_like(p).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    want = y.clone()
    for i, e in enumerate(delta.experts):
        assert isinstance(e, LowRankDelta)
        want += g[..., i : i + 1] * e.scaling * (x @ e.A.t() @ e.B.t())
    assert torch.allclose(delta(x, y), want, atol=1e-5)
    assert torch.allclose(delta.router.balance_loss(), load_balancing_loss(p, (g > 0).float()))


def test_aux_loss_and_training() -> None:
    bb, model = _model("bert", balance_coef=0.5)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = bb.run(model, bb.sample(0))
    routed = [d for d in model.deltas.modules() if isinstance(d, MoeDelta)]
    assert len(routed) == 4  # mlp.up and mlp.down of two layers
    want = sum(0.5 * d.router.balance_loss() for d in routed)
    aux = model.aux_loss()
    assert torch.allclose(aux, want)
    (out.pow(2).mean() + aux).backward()
    opt.step()
    assert all(d.router.weight.grad.abs().sum() > 0 for d in routed)


def test_refusals() -> None:
    bb = unipeft.registry().tiny_backbone("timm_vit")
    with pytest.raises(TargetError, match=r"convolution"):
        unipeft.apply(bb.make(), "mixlora", targets=["embed"])
    with pytest.raises(ConfigError, match=r"top_k"):
        unipeft.apply(bb.make(), "mixlora", num_experts=2, top_k=3)
    with pytest.raises(ConfigError, match=r"r=40.*<= 32"):
        unipeft.apply(bb.make(), "mixlora", r=40, targets=["attn.q"])
