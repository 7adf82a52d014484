"""One rule for adapter names, applied by every way an adapter enters a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import unipeft
from unipeft.contract.plan import adapter_name_refusal
from unipeft.testing.backbones import BACKBONES

BAD = {
    "trailing newline": "evil\n",
    "leading newline": "\nevil",
    "slash": "a/b",
    "dot": "a.b",
    "colon": "a::b",
    "space": "a b",
    "empty": "",
    "reserved": "__base__",
    "non-ASCII": "adaptér",
    "too long": "a" * 129,
}
GOOD = ["a", "A-1_b", "a" * 128, "__base", "base__"]


def _state(model: unipeft.DeltaModel) -> tuple:
    base = model.base_model
    return (
        sorted(model.state_dict()),
        {k: v.clone() for k, v in base.state_dict().items()},
        dict(model.adapters),
        model.active_adapters,
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.modules()),
    )


def _assert_same(a: tuple, b: tuple) -> None:
    assert a[0] == b[0] and a[2] == b[2] and a[3] == b[3] and a[4] == b[4]
    for k, v in a[1].items():
        assert torch.equal(b[1][k], v), k


@pytest.mark.parametrize("name", GOOD)
def test_good_names_pass(name: str) -> None:
    assert adapter_name_refusal(name) is None
    model = unipeft.apply(BACKBONES["bert"].make(), "lora", r=2, adapter_name=name)
    assert model.active_adapters == (name,)


@pytest.mark.parametrize("case", sorted(BAD))
def test_add_adapter_refuses(case: str) -> None:
    model = unipeft.apply(BACKBONES["bert"].make(), "lora", r=2)
    before = _state(model)
    with pytest.raises(unipeft.AdapterError, match="adapter name"):
        model.add_adapter(BAD[case], "bitfit")
    _assert_same(before, _state(model))


@pytest.mark.parametrize("case", sorted(BAD))
def test_apply_refuses_before_touching_the_backbone(case: str) -> None:
    backbone = BACKBONES["gpt2"].make()
    flags = {n: p.requires_grad for n, p in backbone.named_parameters()}
    with pytest.raises(unipeft.AdapterError, match="adapter name"):
        unipeft.apply(backbone, "lora", r=2, adapter_name=BAD[case])
    assert {n: p.requires_grad for n, p in backbone.named_parameters()} == flags
    assert not any(m._forward_hooks for m in backbone.modules())
    unipeft.apply(backbone, "lora", r=2)  # not left wrapped


@pytest.mark.parametrize("case", sorted(BAD))
def test_load_refuses_a_saved_name_that_breaks_the_rule(case: str, tmp_path: Path) -> None:
    model = unipeft.apply(BACKBONES["bert"].make(), "lora", r=2)
    model.save(tmp_path)
    config = tmp_path / "unipeft_adapters.json"
    doc = json.loads(config.read_text())
    doc["adapters"][BAD[case]] = doc["adapters"].pop("default")
    config.write_text(json.dumps(doc))
    backbone = BACKBONES["bert"].make()
    original = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(unipeft.LoadError, match=r"unipeft_adapters\.json names an adapter"):
        unipeft.load(backbone, tmp_path)
    assert not any(m._forward_hooks for m in backbone.modules())
    for k, v in original.items():
        assert torch.equal(backbone.state_dict()[k], v), k


@pytest.mark.parametrize("case", ["trailing newline", "slash", "reserved"])
def test_combine_refuses(case: str) -> None:
    model = unipeft.apply(BACKBONES["bert"].make(), "lora", r=2)
    before = _state(model)
    with pytest.raises(unipeft.AdapterError, match="adapter name"):
        unipeft.arithmetic.combine(model, {"default": 1.0}, BAD[case])
    _assert_same(before, _state(model))


@pytest.mark.parametrize("case", ["trailing newline", "dot", "reserved"])
def test_peft_import_refuses(case: str, tmp_path: Path) -> None:
    bb = BACKBONES["bert"]
    source = unipeft.apply(bb.make(), "lora", r=2)
    unipeft.interop.peft.save(source, tmp_path)
    model = unipeft.apply(bb.make(), "bitfit")
    before = _state(model)
    with pytest.raises(unipeft.AdapterError, match="adapter name"):
        unipeft.interop.peft.load(model, tmp_path, adapter_name=BAD[case])
    _assert_same(before, _state(model))
    with pytest.raises(unipeft.AdapterError, match="adapter name"):
        unipeft.interop.peft.load(bb.make(), tmp_path, adapter_name=BAD[case])


def test_mixed_batches_name_the_unknown_adapter() -> None:
    bb = BACKBONES["bert"]
    model = unipeft.apply(bb.make(), "lora", r=2)
    x = bb.sample(0)
    with pytest.raises(unipeft.AdapterError, match=r"unknown adapter 'evil\\n'"):
        model(**x, adapter_names=["default", "evil\n"])
