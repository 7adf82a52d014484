"""Compacter: PHM weights rebuilt with torch.kron from the shared slow matrices and the
per-layer rank-r fast factors, the adapted forward against plain-torch hooks on a copy of
the backbone, the parameter count, the shared rule, refusals. (Hugging Face PEFT has no
Compacter.)"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

pytest.importorskip("transformers")
pytest.importorskip("timm")

from _parity import make

import unipeft
from unipeft import ConfigError

IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def run(model: nn.Module, arch: str) -> Tensor:
    with torch.no_grad():
        if arch == "bert":
            return model(input_ids=IDS).last_hidden_state
        return model(IMAGES)


def randomise(model: unipeft.DeltaModel, std: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.deltas.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def kron_weight(rule: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """Σ_i A_i ⊗ (s_i t_iᵀ) with torch.kron, one term at a time."""
    return sum(torch.kron(rule[i], s[i] @ t[i].t()) for i in range(rule.shape[0]))


def hand_hook(rule: Tensor, delta):
    """A forward hook computing the serial adapter in plain torch from the delta's tensors."""
    wd = kron_weight(rule, delta.down.s.detach(), delta.down.t.detach())
    wu = kron_weight(rule, delta.up.s.detach(), delta.up.t.detach())
    bd, bu = delta.down.bias.detach(), delta.up.bias.detach()

    def hook(_module, _inputs, y):
        return y + F.gelu(y @ wd.t() + bd) @ wu.t() + bu

    return hook


@pytest.mark.parametrize("placement", ["compacter", "compacter++"])
@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_against_plain_torch(arch: str, placement: str) -> None:
    base = make(arch)
    by_hand = copy.deepcopy(base)
    model = unipeft.apply(base, "compacter", bottleneck=8, phm_rank=2, placement=placement)
    model.eval()
    randomise(model)
    adapter = model.adapters["default"]
    rule = adapter.shared.A.detach()
    want_roles = {"attn", "mlp"} if placement == "compacter" else {"mlp"}
    assert {s.role for s in adapter.sites} == want_roles
    for site in adapter.sites:
        delta = adapter.delta_at(site)
        for layer in (delta.down, delta.up):
            w = layer.weight(adapter.shared.A).detach()
            assert torch.allclose(w, kron_weight(rule, layer.s, layer.t).detach(), atol=1e-6)
        hook = hand_hook(rule, delta)
        by_hand.get_submodule(site.path).register_forward_hook(hook)
    want, got = run(by_hand, arch), run(model, arch)
    moved = (want - run(make(arch), arch)).abs().max().item()
    assert moved > 1e-2, "the adapter is (nearly) the identity: nothing is compared"
    diff = (got - want).abs().max().item()
    print(f"\n{arch} {placement}: forward vs plain torch max |diff| = {diff:.3e}")
    assert diff <= 1e-5 * max(1.0, want.abs().max().item())


def test_parameter_count_and_shared_rule() -> None:
    """Per block: 2 sites × (2r(d + k) + d + k), plus n³ once: d = 32, k = 8, r = 1, n = 4."""
    model = unipeft.apply(make("vit"), "compacter", bottleneck=8)
    per_site = 2 * 1 * (32 + 8) + 32 + 8
    assert model.num_trainable_parameters() == 2 * 2 * per_site + 4**3
    adapter = model.adapters["default"]
    assert all(adapter.delta_at(s).shared is adapter.shared for s in adapter.sites)
    assert adapter.shared.A.shape == (4, 4, 4)
    # identity at initialisation: the up projection's fast factor starts at zero
    assert torch.equal(run(model, "vit"), run(make("vit"), "vit"))


def test_rule_trained_by_every_layer() -> None:
    model = unipeft.apply(make("bert"), "compacter", bottleneck=8)
    randomise(model)
    adapter = model.adapters["default"]
    for site in adapter.sites:  # each site alone moves the shared A
        model.zero_grad()
        adapter.delta_at(site)(None, torch.randn(3, 32)).sum().backward()
        assert adapter.shared.A.grad is not None and adapter.shared.A.grad.abs().sum() > 0


def test_refusals_name_the_fields() -> None:
    with pytest.raises(ConfigError, match=r"phm_dim=3 must divide.*32 features"):
        unipeft.apply(make("bert"), "compacter", phm_dim=3, bottleneck=6)
    with pytest.raises(ConfigError, match=r"bottleneck=10 must be a multiple of phm_dim=4"):
        unipeft.apply(make("bert"), "compacter", bottleneck=10)
    with pytest.raises(ConfigError, match="placement"):
        unipeft.apply(make("bert"), "compacter", placement="pfeiffer")


def test_two_adapters_keep_their_own_rule() -> None:
    model = unipeft.apply(make("bert"), "compacter", bottleneck=8)
    model.add_adapter("other", "compacter", phm_dim=2, bottleneck=4, placement="compacter++")
    randomise(model)
    a, b = model.adapters["default"].shared, model.adapters["other"].shared
    assert a is not b and a.A.shape == (4, 4, 4) and b.A.shape == (2, 2, 2)
    model.set_active(["default"])
    only_a = run(model, "bert")
    model.set_active(["other"])
    assert (run(model, "bert") - only_a).abs().max() > 1e-3


def test_budget_searches_the_rank() -> None:
    plan = unipeft.plan_budget(make("bert"), "compacter", 0.05, bottleneck=8)
    assert plan.config["bottleneck"] == 8 and plan.config["phm_rank"] >= 1
    model = unipeft.apply(make("bert"), "compacter", **plan.config)
    assert model.num_trainable_parameters() == plan.trainable
