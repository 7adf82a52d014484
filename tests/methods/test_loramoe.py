"""LoRAMoE: soft-routed LoRA experts and the localized balancing constraint, against a
computation by hand of Var(I ⊙ Q) / Mean(I ⊙ Q)."""

from __future__ import annotations

import pytest
import torch

import unipeft
from unipeft.methods.moe.loramoe import (
    LoraMoeDelta,
    expert_types,
    localized_balance_loss,
    set_sample_types,
)


def test_localized_balance_loss_by_hand() -> None:
    # 2 samples, 2 tokens each, 4 experts
    gates = torch.tensor(
        [[[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]], [[0.7, 0.1, 0.1, 0.1], [0.5, 0.2, 0.2, 0.1]]]
    )
    experts = torch.tensor([0, 0, 1, 1])
    samples = torch.tensor([1, 0])
    d = 0.1
    q = [[0.5, 0.5, 0.5, 0.5], [1.2, 0.3, 0.3, 0.2]]  # per sample, per expert
    z = []
    for m in range(2):
        for i in range(4):
            same = int(experts[i]) == int(samples[m])
            z.append(q[m][i] * ((1 + d) if same else (1 - d)))
    mean = sum(z) / len(z)
    var = sum((v - mean) ** 2 for v in z) / len(z)
    got = localized_balance_loss(gates, experts, samples, d)
    assert got.item() == pytest.approx(var / mean, rel=1e-5)


def test_soft_mixture_and_aux_loss() -> None:
    bb = unipeft.registry().tiny_backbone("bert")
    model = unipeft.apply(bb.make(), "loramoe", r=2, num_experts=4, balance_coef=0.5)
    adapter = model.adapters["default"]
    assert {s.role for s in adapter.sites} == {"mlp.up", "mlp.down"}
    method = unipeft.get_method("loramoe")
    assert model.num_trainable_parameters() == sum(
        method.num_parameters(adapter.config, s) for s in adapter.sites
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.deltas.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    delta = adapter.delta_at("encoder.layer.0:mlp.up")
    assert isinstance(delta, LoraMoeDelta) and delta.types == [0, 0, 1, 1]
    x, y = torch.randn(2, 3, 32), torch.randn(2, 3, 64)
    g = torch.softmax(x @ delta.router.weight.t(), -1)
    want = y + sum(
        g[..., i : i + 1] * e.scaling * (x @ e.A.t() @ e.B.t()) for i, e in enumerate(delta.experts)
    )
    assert torch.allclose(delta(x, y), want, atol=1e-5)
    # default: every sample downstream (type 1)
    want_loss = 0.5 * localized_balance_loss(g, torch.tensor([0, 0, 1, 1]), torch.ones(2), 0.1)
    assert torch.allclose(delta.aux_loss(), want_loss)
    set_sample_types(model, torch.tensor([0, 1]))
    want_loss = 0.5 * localized_balance_loss(
        g, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1]), 0.1
    )
    assert torch.allclose(delta.aux_loss(), want_loss)
    set_sample_types(model, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"one type .* per sample"):
        delta.aux_loss()
    set_sample_types(model, None)

    out = bb.run(model, bb.sample(0))
    (out.pow(2).mean() + model.aux_loss()).backward()
    assert delta.router.weight.grad.abs().sum() > 0


def test_expert_groups() -> None:
    cfg = unipeft.get_method("loramoe").config(num_experts=5, knowledge_fraction=0.4)
    assert expert_types(cfg) == [0, 0, 1, 1, 1]
    bb = unipeft.registry().tiny_backbone("timm_vit")
    with pytest.raises(unipeft.TargetError, match=r"convolution"):
        unipeft.apply(bb.make(), "loramoe", targets=["embed"])
