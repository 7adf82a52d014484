"""Bad input on every tiny backbone: targets that match nothing, invalid config values,
unknown methods, refused site kinds, taken names, merges that cannot be made, and loads
of saves that do not fit; each error names the problem and the fix, and the model is
as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _matrix import backbones, methods, roles
from torch import nn

import unipeft
from unipeft import (
    AdapterError,
    ConfigError,
    LoadError,
    MergeError,
    PluginError,
    TargetError,
)
from unipeft.maps import ROLES
from unipeft.testing.backbones import BACKBONES


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in m.__dict__)
            for n, m in model.named_modules()
        },
    }


def _assert_unchanged(model: nn.Module, snap: dict) -> None:
    now = _snapshot(model)
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), f"{k} changed"
    assert now["grad"] == snap["grad"]
    assert now["hooks"] == snap["hooks"]


@pytest.fixture(params=backbones())
def backbone(request) -> nn.Module:
    return BACKBONES[request.param].make()


def _missing_roles(name: str) -> list[str]:
    return [r for r in ROLES if r not in roles(name)]


# every backbone that lacks some role (mlp.gate or layer_tokens on every one of them)
@pytest.mark.parametrize("name", backbones(where=lambda bb: bool(_missing_roles(bb.name))))
def test_target_matching_nothing(name: str) -> None:
    backbone = BACKBONES[name].make()
    missing = _missing_roles(name)[0]  # mlp.gate on all but gated MLPs
    snap = _snapshot(backbone)
    with pytest.raises(TargetError) as info:
        unipeft.apply(backbone, "lora", targets=["attn.q", missing])
    msg = str(info.value)
    assert f"'{missing}'" in msg and "attn.q (x" in msg and "mlp.down (x" in msg
    with pytest.raises(TargetError, match="matches no module"):
        unipeft.apply(backbone, "lora", targets=["re:no\\.such\\.module"])
    _assert_unchanged(backbone, snap)


def test_invalid_config_value_names_field_and_range(backbone: nn.Module) -> None:
    snap = _snapshot(backbone)
    with pytest.raises(ConfigError) as info:
        unipeft.apply(backbone, "lora", r=0)
    assert "'r'" in str(info.value) and ">= 1" in str(info.value)
    with pytest.raises(ConfigError, match="dropout"):
        unipeft.apply(backbone, "lora", dropout=1.5)
    with pytest.raises(ConfigError, match=r"'rank'.*fields of LoraConfig are: alpha, dropout"):
        unipeft.apply(backbone, "lora", rank=4)
    with pytest.raises(ConfigError, match="top_k"):
        unipeft.apply(backbone, "moe_lora", num_experts=2, top_k=3)
    _assert_unchanged(backbone, snap)


def test_unknown_method_suggests_close_ids(backbone: nn.Module) -> None:
    snap = _snapshot(backbone)
    with pytest.raises(PluginError, match="Did you mean 'lora'"):
        unipeft.apply(backbone, "lorra")
    _assert_unchanged(backbone, snap)


def test_method_refusing_a_site_kind(backbone: nn.Module) -> None:
    snap = _snapshot(backbone)
    with pytest.raises(TargetError, match="projection sites"):
        unipeft.apply(backbone, "lora", targets=["norm"])
    _assert_unchanged(backbone, snap)


def test_adapter_name_in_use(backbone: nn.Module) -> None:
    model = unipeft.apply(backbone, "lora", r=2)
    snap = _snapshot(model)
    with pytest.raises(AdapterError, match="already in use"):
        model.add_adapter("default", "bitfit")
    with pytest.raises(AdapterError, match="invalid"):
        model.add_adapter("has.dot", "bitfit")
    with pytest.raises(AdapterError, match="already carries unipeft adapters"):
        unipeft.apply(backbone, "bitfit")
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("method", methods(mergeable=False))
def test_merge_on_a_method_that_cannot_merge(backbone: nn.Module, method: str) -> None:
    try:
        model = unipeft.apply(backbone, method)
    except TargetError as exc:  # as the kit: vision-only or CLIP-only default targets
        pytest.skip(f"{method} has no default target it attaches to on this backbone: {exc}")
    snap = _snapshot(model)
    with pytest.raises(MergeError, match="cannot be merged"):
        model.merge()
    assert not model.merged
    _assert_unchanged(model, snap)


def test_bitfit_refuses_paths_without_a_bias() -> None:
    backbone = BACKBONES["bert"].make()
    snap = _snapshot(backbone)
    with pytest.raises(TargetError, match="sublayer path"):
        unipeft.apply(backbone, "bitfit", targets=["mlp"])
    _assert_unchanged(backbone, snap)


def test_load_for_a_different_backbone_shape(tmp_path: Path) -> None:
    model = unipeft.apply(BACKBONES["bert"].make(), "lora", r=2)
    model.save(tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    from transformers import BertConfig, BertModel

    wider = BertModel(
        BertConfig(
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=100,
        )
    ).eval()
    snap = _snapshot(wider)
    with pytest.raises(LoadError, match="shape"):
        unipeft.load(wider, tmp_path)
    _assert_unchanged(wider, snap)

    other = BACKBONES["timm_vit"].make()
    snap = _snapshot(other)
    with pytest.raises(LoadError, match="different architecture"):
        unipeft.load(other, tmp_path)
    _assert_unchanged(other, snap)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


def test_load_of_a_corrupt_directory(tmp_path: Path) -> None:
    model = unipeft.apply(BACKBONES["bert"].make(), "lora", r=2)
    model.save(tmp_path)
    fresh = BACKBONES["bert"].make()
    snap = _snapshot(fresh)
    weights = tmp_path / "unipeft_adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(LoadError, match="checksum differs"):
        unipeft.load(fresh, tmp_path)
    config = tmp_path / "unipeft_adapters.json"
    doc = json.loads(config.read_text())
    del doc["weights_sha256"]  # the checksum is required: deleting it turns nothing off
    config.write_text(json.dumps(doc))
    with pytest.raises(LoadError, match="field weights_sha256 is missing"):
        unipeft.load(fresh, tmp_path)
    doc["weights_sha256"] = "unchecked"  # the explicit opt-out: the file itself is checked
    config.write_text(json.dumps(doc))
    with pytest.raises(LoadError, match="truncated"):
        unipeft.load(fresh, tmp_path)
    (tmp_path / "unipeft_adapters.json").write_text("{not json")
    with pytest.raises(LoadError, match="not valid JSON"):
        unipeft.load(fresh, tmp_path)
    (tmp_path / "unipeft_adapters.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(LoadError, match="not a unipeft adapter config"):
        unipeft.load(fresh, tmp_path)
    with pytest.raises(LoadError, match="does not exist"):
        unipeft.load(fresh, tmp_path / "missing")
    _assert_unchanged(fresh, snap)


def test_unknown_adapter_and_unloaded_handle() -> None:
    model = unipeft.apply(BACKBONES["bert"].make(), "lora", r=2)
    with pytest.raises(AdapterError, match="adapters on this model: default"):
        model.set_active("nope")
    model.unload()
    with pytest.raises(AdapterError, match="unloaded"):
        model.merge()
