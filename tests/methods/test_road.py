"""RoAd: ``y' = R y``, scaled 2-D rotations of pairs of output features (bias included);
PEFT folders both ways on BERT and a timm ViT for the three variants, merged weights and
biases included; a fused slice against PEFT's own rotation matrix; the refusals.

Every comparison starts both libraries from ``copy.deepcopy`` of one random backbone, and
the adapters are moved far from the identity before anything is compared."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from _parity_ortho import base as _base  # noqa: E402
from _parity_ortho import (  # noqa: E402
    from_peft,
    report,
    to_peft,
)
from _parity_ortho import max_diff as _diff  # noqa: E402
from _parity_ortho import randomise as _randomise  # noqa: E402

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


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(CASES))
def test_peft_to_unipeft(kind: str, config: str, tmp_path: Path) -> None:
    cfg = CONFIGS[config]
    pcfg = peft.RoadConfig(target_modules=CASES[kind][0], init_weights=False, **cfg)
    theirs, ours, expected = from_peft(_base(kind), kind, pcfg, tmp_path, noise=None)
    loaded = ours.adapters["default"].config
    assert (loaded.variant, loaded.group_size, loaded.init) == (
        cfg["variant"],
        cfg["group_size"],
        "random",
    )  # type: ignore[attr-defined]
    report(ours, kind, expected, theirs, ours, "PEFT -> unipeft", f"road {kind}/{config}")


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(CASES))
def test_unipeft_to_peft(kind: str, config: str, tmp_path: Path) -> None:
    cfg = CONFIGS[config]
    theirs, ours, expected, saved = to_peft(
        _base(kind), kind, "road", CASES[kind][1], cfg, tmp_path
    )
    assert saved["peft_type"] == "ROAD"
    assert (saved["variant"], saved["group_size"]) == (cfg["variant"], cfg["group_size"])
    report(theirs, kind, expected, theirs, ours, "unipeft -> PEFT", f"road {kind}/{config}")


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
