"""MiSS: one shard added to every chunk of the weight (balance, mini, bat); PEFT folders both
ways on BERT and a timm ViT for the three variants, merged weights included; a fused slice
and a GPT-2 Conv1D against PEFT's own merge on the same weights; the refusals.

Every comparison starts both libraries from ``copy.deepcopy`` of one random backbone, and
the adapters are moved far from the identity before anything is compared."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

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
from unipeft.methods.reparameterized.miss import MissDelta  # noqa: E402
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
    "balance": dict(variant="balance", r=5, dropout=0.1),  # 32 inputs: a padded last chunk
    "mini": dict(variant="mini", r=4, mini_r=8),
    "bat": dict(variant="bat", r=4),
}
PEFT_INIT = {"balance": False, "mini": "mini", "bat": "bat"}


def _peft_config(cfg: dict[str, Any], targets: list[str]) -> Any:
    return peft.MissConfig(
        r=cfg["r"],
        mini_r=cfg.get("mini_r", 1),
        miss_dropout=cfg.get("dropout", 0.0),
        init_weights=PEFT_INIT[cfg["variant"]],
        target_modules=targets,
    )


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(CASES))
def test_peft_to_unipeft(kind: str, config: str, tmp_path: Path) -> None:
    cfg = CONFIGS[config]
    pcfg = _peft_config(cfg, CASES[kind][0])
    theirs, ours, expected = from_peft(_base(kind), kind, pcfg, tmp_path, noise="miss_block")
    loaded = ours.adapters["default"].config
    assert loaded.variant == cfg["variant"] and loaded.r == cfg["r"]  # type: ignore[attr-defined]
    assert loaded.dropout == cfg.get("dropout", 0.0)  # type: ignore[attr-defined]
    report(ours, kind, expected, theirs, ours, "PEFT -> unipeft", f"miss {kind}/{config}")


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(CASES))
def test_unipeft_to_peft(kind: str, config: str, tmp_path: Path) -> None:
    cfg = CONFIGS[config]
    theirs, ours, expected, saved = to_peft(
        _base(kind), kind, "miss", CASES[kind][1], cfg, tmp_path
    )
    assert saved["peft_type"] == "MISS" and saved["r"] == cfg["r"]
    assert saved["init_weights"] == (True if config == "balance" else config)
    report(theirs, kind, expected, theirs, ours, "unipeft -> PEFT", f"miss {kind}/{config}")


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("where", ["timm_vit", "gpt2"])
def test_slices_and_conv1d_merge_like_peft(where: str, config: str) -> None:
    """A fused slice (timm's attn.v rows of qkv) and GPT-2's (in, out) Conv1D merge to what
    PEFT's own MissLinear gives on an nn.Linear holding the same canonical weight."""
    from peft.tuners.miss.layer import MissLinear

    cfg = CONFIGS[config]
    bb = BACKBONES[where].make()
    model = unipeft.apply(
        bb, "miss", targets=["attn.v" if where == "timm_vit" else "mlp.up"], **cfg
    )
    _randomise(model.deltas.parameters(), seed=3)
    site = model.adapters["default"].sites[0]
    delta = model.adapters["default"].delta_at(site)
    assert isinstance(delta, MissDelta)
    weight = site.weight_views()[0].clone()
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight.copy_(weight)
    layer = MissLinear(lin, "default", _peft_config(cfg, []), r=cfg["r"])
    with torch.no_grad():
        layer.miss_block["default"].copy_(delta.block)
    layer.merge()
    model.merge()
    assert _diff(site.weight_views()[0], layer.base_layer.weight.detach()) < 1e-5
    model.unmerge()
    assert torch.equal(site.weight_views()[0], weight)


def test_identity_at_init() -> None:
    method = unipeft.get_method("miss")
    for variant in ("balance", "mini", "bat"):
        assert method.is_identity_at_init(method.config(variant=variant))
    assert not method.is_identity_at_init(method.config(init="random"))
    bert = BACKBONES["bert"].make()
    model = unipeft.apply(copy.deepcopy(bert), "miss", r=4, variant="bat")
    x = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        got = model(input_ids=x).last_hidden_state
        assert torch.equal(got, bert(input_ids=x).last_hidden_state)


def test_refusals(tmp_path: Path) -> None:
    bert = BACKBONES["bert"].make()  # 32 -> 32 attention projections
    with pytest.raises(ConfigError, match=r"r=64 is larger than the 32 input .*r <= 32"):
        unipeft.apply(bert, "miss")  # PEFT's default r, on a 32-wide model
    with pytest.raises(ConfigError, match=r"r=5 must divide both .*'bat'"):
        unipeft.apply(bert, "miss", r=5, variant="bat")
    with pytest.raises(ConfigError, match=r"mini_r=5 does not divide the 32 output"):
        unipeft.apply(bert, "miss", r=4, variant="mini", mini_r=5)
    with pytest.raises(ConfigError, match="dropout"):
        unipeft.apply(bert, "miss", r=4, dropout=1.0)
    vit = BACKBONES["timm_vit"].make()
    with pytest.raises(unipeft.UnipeftError, match="convolution"):
        unipeft.apply(vit, "miss", r=4, targets=["embed"])
    gpt2 = BACKBONES["gpt2"].make()  # Conv1D: fine in unipeft, not expressible in PEFT's MiSS
    model = unipeft.apply(gpt2, "miss", r=4, targets=["attn.out"])
    with pytest.raises(AdapterError, match="Conv1D"):
        interop.save(model, tmp_path / "gpt2")
