"""FacT (TT and TK): every ΔW recomputed block by block in plain torch from the shared and
per-block factors, compared to the merged weights and to the adapted forward; the paper's
parameter count; the shared factors; refusals. (Hugging Face PEFT has no FacT.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

from _parity import make  # noqa: E402

import unipeft  # noqa: E402
from unipeft import TargetError  # noqa: E402
from unipeft.testing.backbones import BACKBONES  # noqa: E402

TARGETS = ["attn.q", "attn.k", "attn.v", "attn.out", "mlp.up", "mlp.down"]
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


def reference_delta(adapter, site) -> Tensor:
    """ΔW of ``site`` from the factors, one ``d × d`` block at a time, in plain torch."""
    delta, shared, cfg = adapter.delta_at(site), adapter.shared, adapter.config
    d_in, d_out = site.weight.in_features, site.features
    d = min(d_in, d_out)
    key = f"{site.tower or 'model'}_{d}"
    u, v = shared.U[key].detach(), shared.V[key].detach()
    out = torch.zeros(d_out, d_in)
    for a in range(d_out // d):
        for b in range(d_in // d):
            if cfg.variant == "tt":
                core = delta.sigma[a, b].detach()
            else:  # Tucker: the shared core contracted with this block's vector
                core = sum(shared.core[:, :, k] * delta.p[a, b, k] for k in range(cfg.r))
                core = core.detach()
            out[a * d : (a + 1) * d, b * d : (b + 1) * d] = cfg.scale * u @ core @ v.t()
    return out


def add_by_hand(backbone: nn.Module, site, dw: Tensor) -> None:
    """Add ``dw`` to the rows ``site`` owns in a copy of the backbone (Linear layout)."""
    module = backbone.get_submodule(site.path)
    lo, hi = site.out_slice or (0, site.features)
    with torch.no_grad():
        module.weight[lo:hi] += dw


@pytest.mark.parametrize("variant", ["tt", "tk"])
@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_against_plain_torch(arch: str, variant: str) -> None:
    base = make(arch)
    by_hand = copy.deepcopy(base)
    model = unipeft.apply(base, "fact", variant=variant, r=4, scale=0.7, targets=TARGETS)
    randomise(model)
    adapter = model.adapters["default"]
    before = {s.name: s.weight_views()[0].clone() for s in adapter.sites}
    expected = {s.name: reference_delta(adapter, s) for s in adapter.sites}
    for site in adapter.sites:
        add_by_hand(by_hand, site, expected[site.name])
    want = run(by_hand, arch)
    got = run(model, arch)
    moved = (want - run(make(arch), arch)).abs().max().item()
    assert moved > 1e-2, "the adapter is (nearly) the identity: nothing is compared"
    diff = (got - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    print(f"\n{arch} fact-{variant}: forward vs plain torch max |diff| = {diff:.3e}")
    assert diff <= 1e-5 * scale
    model.merge()
    worst = max(
        (s.weight_views()[0] - before[s.name] - expected[s.name]).abs().max().item()
        for s in adapter.sites
    )
    print(f"{arch} fact-{variant}: merged ΔW vs plain torch max |diff| = {worst:.3e}")
    assert worst <= 1e-6
    assert (run(model, arch) - got).abs().max().item() <= 1e-5 * scale
    model.unmerge()
    assert all(torch.equal(s.weight_views()[0], before[s.name]) for s in adapter.sites)


@pytest.mark.parametrize(("variant", "per_block"), [("tt", 16), ("tk", 4)])
def test_paper_parameter_count(variant: str, per_block: int) -> None:
    """On a ViT (MLP width 4d) the adapted weights are 12 d × d blocks per layer: the paper's
    12L · r² + 2dr (TT) and 12L · r + 2dr + r³ (TK) with r = 4, d = 32, L = 2."""
    model = unipeft.apply(make("vit"), "fact", variant=variant, r=4, targets=TARGETS)
    shared = 2 * 32 * 4 + (4**3 if variant == "tk" else 0)
    assert model.num_trainable_parameters() == 12 * 2 * per_block + shared
    adapter = model.adapters["default"]
    assert dict(adapter.shared.named_parameters()).keys() >= {"U.model_32", "V.model_32"}
    # one pair of factors for every layer and projection: the very same tensors
    assert all(adapter.delta_at(s).shared is adapter.shared for s in adapter.sites)


def test_shared_factors_get_gradient_from_every_site() -> None:
    model = unipeft.apply(make("bert"), "fact", r=4, targets=["attn.q", "attn.v"])
    randomise(model)
    adapter = model.adapters["default"]
    u = adapter.shared.U["model_32"]
    grads = []
    for site in adapter.sites:  # each site alone: its own contribution to U's gradient
        model.zero_grad()
        delta = adapter.delta_at(site)
        x = torch.randn(3, 32)
        delta(x, torch.zeros(3, 32)).sum().backward()
        grads.append(u.grad.clone())
    assert all(g.abs().sum() > 0 for g in grads)
    model.zero_grad()
    model.train()
    model(input_ids=IDS).last_hidden_state.sum().backward()
    assert u.grad is not None and u.grad.abs().sum() > 0


def test_towers_and_block_sizes_get_their_own_factors() -> None:
    clip = unipeft.apply(BACKBONES["open_clip"].make(), "fact", r=2)
    assert sorted(clip.adapters["default"].shared.U.keys()) == ["text_32", "visual_32"]
    llama = unipeft.apply(BACKBONES["llama"].make(), "fact", r=2)  # k, v: 32 -> 16 (GQA)
    assert sorted(llama.adapters["default"].shared.U.keys()) == ["model_16", "model_32"]


def test_refusals_name_the_site_kind() -> None:
    with pytest.raises(TargetError, match=r"convolution.*attn\.q"):
        unipeft.apply(make("vit"), "fact", targets=["embed"])
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
        vocab_size=100,
    )  # fmt: skip
    with pytest.raises(TargetError, match="48 is not a multiple of 32"):
        unipeft.apply(transformers.BertModel(cfg), "fact", targets=["mlp.up"])
    with pytest.raises(unipeft.ConfigError, match="variant"):
        unipeft.apply(make("bert"), "fact", variant="cp")


def test_two_adapters_keep_their_own_factors() -> None:
    model = unipeft.apply(make("bert"), "fact", r=2, targets=["attn.q"])
    model.add_adapter("other", "fact", variant="tk", r=3, targets=["attn.q", "attn.v"])
    randomise(model)
    a, b = model.adapters["default"].shared, model.adapters["other"].shared
    assert a is not b and a.U["model_32"].shape == (32, 2) and b.core.shape == (3, 3, 3)
    model.set_active(["default"])
    only_a = run(model, "bert")
    model.set_active(["other"])
    only_b = run(model, "bert")
    assert (only_a - only_b).abs().max() > 1e-3


def test_budget_searches_the_rank() -> None:
    plan = unipeft.plan_budget(make("bert"), "fact", 0.01, variant="tk", targets=TARGETS)
    model = unipeft.apply(make("bert"), "fact", targets=TARGETS, **plan.config)
    assert plan.config["r"] >= 1 and model.num_trainable_parameters() == plan.trainable
    bigger = unipeft.apply(
        make("bert"), "fact", targets=TARGETS, **{**plan.config, "r": plan.config["r"] + 1}
    )
    assert bigger.num_trainable_parameters() > plan.trainable
