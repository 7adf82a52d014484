"""``moe``: a router over experts of any registered method (ia3, bottleneck_adapter, lora, and
the third-party plugin lora_fa), its formula, its refusals and its auxiliary losses."""

from __future__ import annotations

import pytest
import torch

import unipeft
from unipeft import ConfigError, TargetError
from unipeft.blocks import load_balancing_loss, z_loss
from unipeft.methods.moe.moe import MoeDelta

EXPERTS = {
    "lora": {"r": 2},
    "ia3": {},
    "bottleneck_adapter": {"bottleneck": 4},
    "lora_fa": {"r": 2},  # the plugin in plugins/unipeft-lora-fa
}


def _bb(name: str = "bert"):
    return unipeft.registry().tiny_backbone(name)


def _perturb(model: unipeft.DeltaModel, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.deltas.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("expert", sorted(EXPERTS))
@pytest.mark.parametrize("router", ["soft", "top_k", "top_p"])
def test_mixture_is_the_gated_sum_of_expert_changes(expert: str, router: str) -> None:
    bb = _bb()
    model = unipeft.apply(
        bb.make(), "moe", expert=expert, expert_config=EXPERTS[expert], router=router,
        num_experts=3, top_k=2, top_p=0.6, targets=["attn.v"],
    )  # fmt: skip
    method, cfg = unipeft.get_method("moe"), model.adapters["default"].config
    sites = model.adapters["default"].sites
    emethod = unipeft.get_method(expert)
    ecfg = emethod.config.model_validate(EXPERTS[expert])
    want = sum(32 * 3 + 3 * emethod.num_parameters(ecfg, s) for s in sites)
    assert (
        model.num_trainable_parameters()
        == want
        == sum(method.num_parameters(cfg, s) for s in sites)
    )
    assert torch.allclose(bb.run(model, bb.sample(0)), bb.run(bb.make(), bb.sample(0)), atol=1e-6)

    _perturb(model)
    delta = next(d for d in model.deltas.modules() if isinstance(d, MoeDelta))
    x, y = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    gates = delta.router(x)
    if router == "top_k":
        assert ((gates > 0).sum(-1) == 2).all()
    assert torch.allclose(gates.sum(-1), torch.ones(2, 5))
    expected = y + sum(gates[..., i : i + 1] * (e(x, y) - y) for i, e in enumerate(delta.experts))
    assert torch.allclose(delta(x, y), expected, atol=1e-6)


def test_per_sample_routing_gives_one_gate_set_per_sample() -> None:
    bb = _bb()
    model = unipeft.apply(
        bb.make(), "moe", expert="ia3", routing="sample", router="top_k", top_k=1,
        targets=["attn.v"],
    )  # fmt: skip
    _perturb(model)
    delta = next(d for d in model.deltas.modules() if isinstance(d, MoeDelta))
    x = torch.randn(3, 6, 32)
    gates = delta.router(x, 3)
    assert gates.shape == (3, 1, 4)
    # one sample alone routes as within the batch
    assert torch.allclose(delta(x[1:2], x[1:2]), delta(x, x)[1:2], atol=1e-6)


def test_aux_loss_is_the_weighted_router_losses() -> None:
    bb = _bb("timm_vit")
    model = unipeft.apply(
        bb.make(), "moe", expert="lora", router="top_k", top_k=1, balance_coef=0.5,
        z_coef=0.25, targets=["attn.q", "mlp.up"],
    )  # fmt: skip
    _perturb(model)
    bb.run(model, bb.sample(0))
    want = 0
    for delta in model.deltas.modules():
        if isinstance(delta, MoeDelta):
            logits, probs, chosen = delta.router.last
            assert chosen.sum(-1).eq(1).all()  # top-1: one decision per token
            want = want + 0.5 * load_balancing_loss(probs, chosen) + 0.25 * z_loss(logits)
    got = model.aux_loss()
    assert got is not None and torch.allclose(got, want)
    got.backward()  # the losses reach the routers
    assert all(
        d.router.weight.grad is not None and d.router.weight.grad.abs().sum() > 0
        for d in model.deltas.modules()
        if isinstance(d, MoeDelta)
    )
    quiet = unipeft.apply(bb.make(), "moe", balance_coef=0.0, z_coef=0.0, targets=["attn.q"])
    bb.run(quiet, bb.sample(0))
    assert quiet.aux_loss() is None


def test_several_adapters_and_save_load(tmp_path) -> None:
    bb = _bb("gpt2")
    model = unipeft.apply(bb.make(), "moe", expert="lora_fa", expert_config={"r": 2})
    model.add_adapter("b", "moe", expert="bottleneck_adapter", router="top_p", targets=["mlp"])
    _perturb(model)
    outs = {}
    for name in ("default", "b"):
        model.set_active([name])
        outs[name] = bb.run(model, bb.sample(1))
    assert not torch.allclose(outs["default"], outs["b"])
    model.set_active(["default", "b"])
    both = bb.run(model, bb.sample(1))
    model.save(str(tmp_path))
    loaded = unipeft.load(bb.make(), str(tmp_path))
    assert loaded.adapters["default"].config.expert == "lora_fa"
    assert torch.allclose(bb.run(loaded, bb.sample(1)), both, atol=1e-6)


def test_refusals_name_the_problem() -> None:
    bb = _bb("timm_vit")
    with pytest.raises(ConfigError, match=r"expert_config.*'r'|expert_config.*r:"):
        unipeft.apply(bb.make(), "moe", expert="lora", expert_config={"r": 0})
    with pytest.raises(ConfigError, match=r"expert.*unknown method 'lroa'.*lora"):
        unipeft.apply(bb.make(), "moe", expert="lroa")
    with pytest.raises(ConfigError, match=r"expert.*sequence.*soft"):
        unipeft.apply(bb.make(), "moe", expert="prompt_tuning")
    with pytest.raises(ConfigError, match=r"expert.*shares one module"):
        unipeft.apply(bb.make(), "moe", expert="vera")
    with pytest.raises(TargetError, match=r"sequence site"):
        unipeft.apply(bb.make(), "moe", targets=["tokens"])
    with pytest.raises(TargetError, match=r"convolution"):
        unipeft.apply(bb.make(), "moe", targets=["embed"])
    # the expert's own refusal is passed on: ia3 takes projections only
    with pytest.raises(TargetError, match=r"expert 'ia3' refuses.*projection sites"):
        unipeft.apply(bb.make(), "moe", expert="ia3", targets=["mlp"])
    with pytest.raises(ConfigError, match=r"top_k"):
        unipeft.apply(bb.make(), "moe", router="top_k", top_k=5, num_experts=4)


def test_training_step_moves_router_and_experts() -> None:
    bb = _bb()
    model = unipeft.apply(bb.make(), "moe", expert="lora", router="top_k", targets=["attn.q"])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.deltas.named_parameters()}
    for step in range(3):
        out = bb.run(model, bb.sample(step))
        loss = out.pow(2).mean() + model.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = [n for n, p in model.deltas.named_parameters() if not torch.equal(p, before[n])]
    assert any("router" in n for n in moved) and any(".B" in n for n in moved)
