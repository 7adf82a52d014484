"""RoAd: ``y' = R y``, scaled 2-D rotations of pairs of output features (bias included);
PEFT folders both ways on BERT and a timm ViT for the three variants, merged weights and
biases included; a fused slice against PEFT's own rotation matrix; the refusals.

Every comparison starts both libraries from ``copy.deepcopy`` of one random backbone, and
the adapters are moved far from the identity before anything is compared."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

import unipeft  # noqa: E402
from unipeft import AdapterError, ConfigError  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402
from unipeft.testing.backbones import BACKBONES  # noqa: E402

CASES = {
    # kind: (PEFT target_modules, unipeft targets)
    "bert": (
        ["query", "value", "intermediate.dense"],
        [r"encoder\.layer\.\d+\.attention\.self\.(query|value)", r".*intermediate\.dense"],
    ),
    "vit": (
        ["qkv", "fc1"],
        [r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.mlp\.fc1"],
    ),
}
CONFIGS = {
    "road_1": dict(variant="road_1", group_size=8),
    "road_2": dict(variant="road_2", group_size=4),
    "road_4": dict(variant="road_4", group_size=32),
}


def _base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return transformers.BertModel(cfg).eval()
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
        depth=2, num_heads=2, num_classes=5, drop_rate=0.0,
    ).eval()  # fmt: skip


def _run(model: nn.Module, kind: str) -> Tensor:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if kind == "vit":
            return model(torch.randn(2, 3, 32, 32, generator=g))
        return model(input_ids=torch.randint(0, 100, (2, 7), generator=g)).last_hidden_state


def _randomise(params: Any, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)


def _diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def _close(a: Tensor, b: Tensor, what: str) -> float:
    d = _diff(a, b)
    scale = max(1.0, b.abs().max().item())
    assert d <= 1e-5 * scale, f"{what}: largest difference {d:.3e} (output scale {scale:.3g})"
    return d


def _merged_weights(peft_model: Any, ours: unipeft.DeltaModel) -> float:
    """Largest difference between PEFT's merge_and_unload() and unipeft's merge()."""
    ours.merge()
    mine = ours.base_model.state_dict()
    theirs = peft_model.merge_and_unload().state_dict()
    assert set(mine) == set(theirs)
    return max(_close(mine[k], theirs[k], f"merged {k}") for k in mine)


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(CASES))
def test_peft_to_unipeft(kind: str, config: str, tmp_path: Path) -> None:
    cfg = CONFIGS[config]
    base = _base(kind)
    pcfg = peft.RoadConfig(target_modules=CASES[kind][0], init_weights=False, **cfg)
    theirs = peft.get_peft_model(copy.deepcopy(base), pcfg).eval()
    theirs.save_pretrained(tmp_path)
    expected = _run(theirs, kind)
    assert _diff(expected, _run(base, kind)) > 1e-3, "the PEFT adapter is the identity"
    ours = interop.load(copy.deepcopy(base), tmp_path).eval()
    loaded = ours.adapters["default"].config
    assert (loaded.variant, loaded.group_size, loaded.init) == (
        cfg["variant"],
        cfg["group_size"],
        "random",
    )  # type: ignore[attr-defined]
    d = _close(_run(ours, kind), expected, "PEFT -> unipeft output")
    m = _merged_weights(theirs, ours)
    print(f"\nroad {kind}/{config} PEFT->unipeft: output {d:.2e}, merged weights {m:.2e}")


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(CASES))
def test_unipeft_to_peft(kind: str, config: str, tmp_path: Path) -> None:
    cfg = CONFIGS[config]
    base = _base(kind)
    ours = unipeft.apply(copy.deepcopy(base), "road", targets=CASES[kind][1], **cfg).eval()
    _randomise(ours.deltas.parameters(), seed=2)
    expected = _run(ours, kind)
    assert _diff(expected, _run(base, kind)) > 1e-3, "the unipeft adapter is the identity"
    interop.save(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ROAD"
    assert (saved["variant"], saved["group_size"]) == (cfg["variant"], cfg["group_size"])
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    d = _close(_run(theirs, kind), expected, "unipeft -> PEFT output")
    m = _merged_weights(theirs, ours)
    print(f"\nroad {kind}/{config} unipeft->PEFT: output {d:.2e}, merged weights {m:.2e}")


@pytest.mark.parametrize("variant", ["road_1", "road_4"])
def test_fused_slice_is_peft_rotation(variant: str) -> None:
    """On timm's fused qkv, merging attn.v multiplies its rows of the weight and of the bias
    by PEFT's rotation matrix, and leaves the q and k rows alone."""
    from peft.tuners.road.layer import _get_delta_weight as peft_rotation

    vit = BACKBONES["timm_vit"].make()
    model = unipeft.apply(vit, "road", variant=variant, group_size=8, targets=["attn.v"])
    _randomise(model.deltas.parameters(), seed=3)
    delta = model.adapters["default"].delta_at("blocks.0:attn.v")
    rot = peft_rotation(variant, 8, delta.theta.detach(), delta.alpha.detach())
    qkv = vit.blocks[0].attn.qkv
    e = qkv.in_features
    w, b = qkv.weight.detach().clone(), qkv.bias.detach().clone()
    model.merge()
    assert _diff(qkv.weight.detach()[2 * e :], rot @ w[2 * e :]) < 1e-6
    assert _diff(qkv.bias.detach()[2 * e :], rot @ b[2 * e :]) < 1e-6
    assert torch.equal(qkv.weight.detach()[: 2 * e], w[: 2 * e]), "q and k rows changed"
    model.unmerge()
    assert torch.equal(qkv.weight.detach(), w) and torch.equal(qkv.bias.detach(), b)


def test_identity_at_init() -> None:
    method = unipeft.get_method("road")
    assert method.is_identity_at_init(method.config())
    assert not method.is_identity_at_init(method.config(init="random"))
    bert = BACKBONES["bert"].make()
    model = unipeft.apply(copy.deepcopy(bert), "road", group_size=8)
    x = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        got = model(input_ids=x).last_hidden_state
        assert torch.equal(got, bert(input_ids=x).last_hidden_state)


def test_refusals(tmp_path: Path) -> None:
    bert = BACKBONES["bert"].make()
    with pytest.raises(ConfigError, match=r"group_size=64 does not divide the 32 output"):
        unipeft.apply(bert, "road")  # PEFT's default group size, on a 32-wide model
    with pytest.raises(ConfigError, match="group_size"):
        unipeft.apply(bert, "road", group_size=5)
    with pytest.raises(ConfigError, match="variant"):
        unipeft.apply(bert, "road", group_size=8, variant="road_3")
    vit = BACKBONES["timm_vit"].make()
    with pytest.raises(unipeft.UnipeftError, match="convolution"):
        unipeft.apply(vit, "road", group_size=8, targets=["embed"])
    gpt2 = BACKBONES["gpt2"].make()  # Conv1D: fine in unipeft, not expressible in PEFT's RoAd
    model = unipeft.apply(gpt2, "road", group_size=8, targets=["attn.out"])
    with pytest.raises(AdapterError, match="Conv1D"):
        interop.save(model, tmp_path / "gpt2")
