"""unipeft.compose: Stack, Parallel, Average and Fuse passed to set_active (the formulas of
docs/composition.md, checked by hand on a one-layer model; refusals; saving)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import unipeft
from unipeft.compose import Average, Fuse, Parallel, Stack, from_json
from unipeft.testing.backbones import BACKBONES
from unipeft.testing.invariants import perturb

CONFIG = "unipeft_adapters.json"


def _linear_model(adapters: tuple[str, ...] = ("a", "b")) -> unipeft.DeltaModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6)).eval()
    model = unipeft.apply(net, "lora", r=2, targets=["0"])
    model.set_active([])
    model.delete_adapter("default")
    for name in adapters:
        model.add_adapter(name, "lora", r=2, targets=["0"])
    perturb(model)
    return model


def _delta(model: unipeft.DeltaModel, name: str) -> torch.Tensor:
    """``ΔW = s · B A`` of adapter ``name`` at site ``0``."""
    delta = model.get_adapter(name).delta_at("0")
    return delta.delta_weight().detach()


# ------------------------------------------------------------------------ the objects


def test_compositions_are_frozen_validated_and_round_trip_through_json() -> None:
    comp = Stack(Fuse("a", Stack("b", "c"), temperature=2.0), Average("d", "e", weights=[1, 3]))
    assert comp.leaves() == ("a", "b", "c", "d", "e")
    assert from_json(json.loads(json.dumps(comp.to_json()))) == comp
    assert comp.children[1].effective_weights() == (0.25, 0.75)
    assert Average("a", "b", weights=[2, 2], normalize=False).effective_weights() == (2.0, 2.0)
    assert Fuse("a", "b").name == "a+b"
    with pytest.raises(AttributeError, match="frozen"):
        comp.children = ()  # type: ignore[misc]


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: Stack(), "at least one"),
        (lambda: Stack("a", "a"), "twice"),
        (lambda: Stack("a b"), "adapter name"),
        (lambda: Average("a", "b", weights=[1]), "one number per child"),
        (lambda: Average("a", "b", weights=[1, -1]), "non-negative"),
        (lambda: Average("a", weights=[float("nan")]), "finite"),
        (lambda: Fuse(Average("a", "b")), "Stack"),
        (lambda: Fuse("a", temperature=0), "temperature"),
        (lambda: Parallel(Stack("a", "b")), "adapter names only"),
        (lambda: from_json({"op": "split", "children": ["a"]}), "composition.op"),
        (lambda: from_json({"op": "stack", "children": ["a"], "x": 1}), "unknown field"),
    ],
)
def test_bad_compositions_are_refused_by_name(make, words: str) -> None:
    with pytest.raises(unipeft.ConfigError, match=words):
        make()


# ------------------------------------------------------------------------ the formulas


def test_stack_is_the_active_list_bit_for_bit() -> None:
    bb = BACKBONES["bert"]
    model = unipeft.apply(bb.make(), "lora", r=4)
    model.add_adapter("serial", "bottleneck_adapter")
    perturb(model)
    with torch.no_grad():
        model.set_active(["default", "serial"])
        listed = bb.run(model, bb.sample(0))
        model.set_active(Stack("default", "serial"))
        assert torch.equal(bb.run(model, bb.sample(0)), listed)
    assert model.active_adapters == ("default", "serial")


def test_average_is_the_weighted_sum_of_changes() -> None:
    model = _linear_model()
    x = torch.randn(3, 8)
    net = model.base_model
    w, b = net[0].weight.detach(), net[0].bias.detach()
    for comp, weights in (
        (Average("a", "b"), (0.5, 0.5)),
        (Average("a", "b", weights=[1, 3]), (0.25, 0.75)),
        (Average("a", "b", weights=[2, -1], normalize=False), (2.0, -1.0)),
    ):
        model.set_active(comp)
        expected = x @ (w + weights[0] * _delta(model, "a") + weights[1] * _delta(model, "b")).T
        with torch.no_grad():
            got = model(x)
        torch.testing.assert_close(got, expected + b, atol=1e-6, rtol=1e-5)


def test_fuse_is_attention_over_the_adapters_changes() -> None:
    model = _linear_model()
    model.set_active(Fuse("a", "b", temperature=2.0))
    layer = model.fusions["a+b"]["0"]
    assert torch.equal(layer.value.weight, torch.eye(6))  # V starts as the identity
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(5, 8)
    net = model.base_model
    y = x @ net[0].weight.detach().T + net[0].bias.detach()
    o = torch.stack([x @ _delta(model, n).T for n in ("a", "b")], dim=-2)  # (5, 2, 6)
    q = y @ layer.query.weight.T + layer.query.bias
    k = o @ layer.key.weight.T + layer.key.bias
    alpha = torch.softmax((k @ q.unsqueeze(-1)).squeeze(-1) / 2.0, dim=-1)
    expected = y + (alpha.unsqueeze(-1) * (o @ layer.value.weight.T)).sum(-2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-5)
    reg = model.aux_loss()
    want = 0.01 * (torch.eye(6) - layer.value.weight).pow(2).sum()
    torch.testing.assert_close(reg, want)
    assert not any(p.requires_grad for p in model.deltas.parameters()), "fused adapters train"
    assert all(p.requires_grad for p in model.fusions.parameters())


@pytest.mark.parametrize("name", ["bert", "timm_vit", "open_clip"])
def test_parallel_concatenates_each_adapters_outputs(name: str) -> None:
    bb = BACKBONES[name]
    model = unipeft.apply(bb.make(), "lora", r=4)
    model.add_adapter("other", "ia3")
    perturb(model)
    inputs = bb.sample(0)
    with torch.no_grad():
        alone = []
        for adapter in ("default", "other"):
            model.set_active(adapter)
            alone.append(bb.outputs(model, inputs))
        model.set_active(Parallel("default", "other"))
        got = bb.outputs(model, inputs)
    for k, tensor in enumerate(got):
        torch.testing.assert_close(
            tensor, torch.cat([alone[0][k], alone[1][k]]), atol=1e-5, rtol=1e-4
        )
    with pytest.raises(RuntimeError, match="Parallel"):
        with torch.no_grad():
            bb.outputs(model.base_model, inputs)  # the backbone itself: nothing replicates


# ------------------------------------------------------------------------ refusals


def test_operators_refuse_what_has_no_meaning() -> None:
    bb = BACKBONES["bert"]
    model = unipeft.apply(bb.make(), "prompt_tuning", num_tokens=2)
    model.add_adapter("q", "lora")
    for comp, op in ((Average("q", "default"), "Average"), (Fuse("default", "q"), "Fuse")):
        with pytest.raises(unipeft.AdapterError, match=rf"{op}.*'default'.*prompt_tuning.*Stack"):
            model.set_active(comp)
    assert model.active_adapters == ("default",)  # a refusal changes nothing
    with pytest.raises(unipeft.AdapterError, match="only as the composition itself"):
        model.set_active(Stack("q", Parallel("default")))
    with pytest.raises(unipeft.AdapterError, match="unknown adapter 'zz'"):
        model.set_active(Average("q", "zz"))
    model.set_active(Stack("default", "q"))  # prompts and a weight change stack
    model.set_active(Average("q"))
    with pytest.raises(unipeft.MergeError, match=r"merge\(\) is refused while Average"):
        model.merge()
    model.set_active("q")
    model.merge()
    with pytest.raises(unipeft.MergeError, match=r"Average cannot combine adapter 'q'.*merged"):
        model.set_active(Average("q"))
    model.unmerge()
    model.add_adapter("r", "lora")
    model.set_active(Fuse("q", "r", name="f"))
    with pytest.raises(unipeft.AdapterError, match="already fuses"):
        model.set_active(Fuse("q", name="f"))
    model.set_active(["q"])
    model.delete_adapter("r")
    assert "f" not in model.fusions, "a fusion outlived one of its adapters"


# ------------------------------------------------------------------------ saving


def test_the_composition_and_fusions_are_saved_and_loaded(tmp_path: Path) -> None:
    bb = BACKBONES["gpt2"]
    model = unipeft.apply(bb.make(), "lora", r=4)
    model.add_adapter("b", "bottleneck_adapter")
    model.add_adapter("c", "bitfit")
    perturb(model)
    comp = Stack(Fuse("default", "b"), Average("c", weights=[0.5], normalize=False))
    model.set_active(comp)
    perturb(model, seed=5)  # the fusion layers too
    with torch.no_grad():
        expected = bb.run(model, bb.sample(0))
    model.save(tmp_path)
    doc = json.loads((tmp_path / CONFIG).read_text())
    assert doc["format_version"] == 2 and from_json(doc["composition"]) == comp
    assert set(doc["fusions"]) == {"default+b"}
    loaded = unipeft.load(bb.make(), str(tmp_path))
    assert loaded.active_composition == comp
    with torch.no_grad():
        assert torch.equal(bb.run(loaded, bb.sample(0)), expected)
    # a save without a composition has neither field (files exactly as before)
    plain = unipeft.apply(bb.make(), "lora", r=4)
    plain.save(tmp_path / "plain")
    assert {"composition", "fusions"}.isdisjoint(
        json.loads((tmp_path / "plain" / CONFIG).read_text())
    )
    # a bad composition in the file is refused, naming the field
    doc["composition"]["children"][1]["weights"] = [1, 2]
    doc["weights_sha256"] = "unchecked"
    (tmp_path / CONFIG).write_text(json.dumps(doc))
    with pytest.raises(
        unipeft.LoadError, match=r"composition\.children\[1\].*one number per child"
    ):
        unipeft.load(bb.make(), str(tmp_path))
