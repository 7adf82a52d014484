"""MAM adapter (prefix on attention + scaled parallel FFN adapter) and UniPELT's gated
prefix: each part computes what its formula says, checked against the parts built alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

import unipeft
from unipeft.maps.tiny import BUILTIN_TINY_BACKBONES

TINY = {tb.name: tb for tb in BUILTIN_TINY_BACKBONES}


def _outputs(model: torch.nn.Module, name: str) -> Tensor:
    tb = TINY[name]
    with torch.no_grad():
        return tb.run(model, tb.sample())


def _perturb(model: unipeft.DeltaModel, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("name", ["bert", "llama", "timm_vit", "open_clip"])
def test_mam_is_prefix_plus_parallel_adapter(name: str) -> None:
    """MAM's output equals a prefix_tuning adapter and a parallel bottleneck_adapter
    (scaling 4) with the same tensors, active together."""
    base = TINY[name].make()
    mam = unipeft.apply(copy.deepcopy(base), "mam_adapter", prefix_tokens=3, bottleneck=8)
    _perturb(mam)
    sites = mam.adapters["default"].sites
    prefix_sites = [s for s in sites if s.role != "mlp"]
    mlp_sites = [s for s in sites if s.role == "mlp"]
    assert prefix_sites and mlp_sites
    parts = unipeft.apply(
        copy.deepcopy(base), "prefix_tuning", num_tokens=3, targets=["tokens?", "attn?"]
    )
    parts.add_adapter(
        "ffn", "bottleneck_adapter", placement="parallel", bottleneck=8, scaling=4.0,
        activation="relu", targets=["mlp"],
    )  # fmt: skip
    parts.set_active(["default", "ffn"])
    with torch.no_grad():
        for site in sites:
            key = site.name.replace(".", "__")
            src = mam.deltas["default"][key].state_dict()
            adapter = "ffn" if site.role == "mlp" else "default"
            parts.deltas[adapter][key].load_state_dict(src)
    got, want = _outputs(mam, name), _outputs(parts, name)
    moved = (got - _outputs(base, name)).abs().max().item()
    print(
        f"{name}: MAM vs parts max |diff| {(got - want).abs().max().item():.3e}, moved {moved:.3g}"
    )
    assert moved > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mam_parameter_count_and_defaults() -> None:
    method = unipeft.get_method("mam_adapter")
    cfg = method.config()
    assert (cfg.prefix_tokens, cfg.bottleneck, cfg.scaling) == (30, 512, 4.0)
    assert method.budget_field == "prefix_tokens" and not method.mergeable
    dm = unipeft.apply(TINY["timm_vit"].make(), "mam_adapter", prefix_tokens=5, bottleneck=8)
    d = 32
    per_layer = 5 * 2 * d + (d * 8 + 8 + 8 * d + d)
    assert dm.num_trainable_parameters() == 2 * per_layer


def test_mam_refusals() -> None:
    with pytest.raises(unipeft.TargetError, match="target 'tokens'"):
        unipeft.apply(TINY["gpt2"].make(), "mam_adapter", targets=["attn", "mlp"])
    with pytest.raises(unipeft.TargetError, match="convolution"):
        unipeft.apply(TINY["timm_vit"].make(), "mam_adapter", targets=["embed"])
    with pytest.raises(unipeft.ConfigError, match="prefix_tokens"):
        unipeft.apply(TINY["bert"].make(), "mam_adapter", prefix_tokens=0)
    with pytest.raises(unipeft.ConfigError, match="prefix_tokens=64"):
        unipeft.apply(TINY["gpt2"].make(), "mam_adapter", prefix_tokens=64)


@pytest.mark.parametrize("name", ["gpt2", "timm_vit"])
def test_unipelt_gated_prefix(name: str) -> None:
    """UniPELT's prefix part is a prefix scaled by sigmoid(gate) for keys and values: with
    the gates at +inf it is the plain prefix (prefix_tuning with the same tensors)."""
    base = TINY[name].make()
    up = unipeft.apply(
        copy.deepcopy(base), "unipelt", prefix_tokens=3, targets=["tokens?", "attn?"]
    )
    sites = up.adapters["default"].sites
    assert all(s.role in ("tokens", "attn") for s in sites)
    plain = unipeft.apply(copy.deepcopy(base), "prefix_tuning", num_tokens=3)
    with torch.no_grad():
        for site in sites:
            key = site.name.replace(".", "__")
            delta = up.deltas["default"][key]
            delta.gate.fill_(1e4)  # sigmoid = 1
            plain.deltas["default"][key].kv.copy_(delta.kv)
    torch.testing.assert_close(_outputs(up, name), _outputs(plain, name), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for site in sites:
            up.deltas["default"][site.name.replace(".", "__")].gate.fill_(-1e4)  # gates shut
    # shut gates: zero keys and values still take attention mass, so not the base output
    assert (_outputs(up, name) - _outputs(base, name)).abs().max() > 1e-4


def test_unipelt_prompt_tokens_is_the_former_name() -> None:
    model = TINY["bert"].make()
    old = unipeft.apply(copy.deepcopy(model), "unipelt", prompt_tokens=4)
    assert old.adapters["default"].config.prefix_length == 4
    assert "tokens" in [s.name for s in old.adapters["default"].sites]
    both = unipeft.apply(copy.deepcopy(model), "unipelt", prompt_tokens=4, prefix_tokens=5)
    assert both.adapters["default"].config.prefix_length == 4  # the former name wins
    none = unipeft.apply(copy.deepcopy(model), "unipelt", prefix_tokens=0)
    assert "tokens" not in [s.name for s in none.adapters["default"].sites]


def test_unipelt_counts() -> None:
    dm = unipeft.apply(TINY["llama"].make(), "unipelt", prefix_tokens=3, targets=["tokens"])
    # llama: 2 layers, 1 key/value head of 16: 3·2·2·16 + 2 gates per layer
    assert dm.num_trainable_parameters() == 3 * 2 * 2 * 16 + 2 * 2
