"""Many adapters on one backbone: listing, exact merges, mixed batches, bad input."""

from __future__ import annotations

import pytest
import torch
from _matrix import backbones

import unipeft
from unipeft import AdapterError, MergeError
from unipeft.testing.backbones import BACKBONES
from unipeft.testing.invariants import perturb


def _two_loras(name: str = "bert", dtype: torch.dtype = torch.float32) -> unipeft.DeltaModel:
    model = unipeft.apply(BACKBONES[name].make(dtype), "lora", r=2, adapter_name="a")
    model.add_adapter("b", "lora", r=5, targets=["attn.q", "attn.k", "mlp.up"])
    perturb(model, seed=1, adapter="a")
    perturb(model, seed=2, adapter="b")
    return model


def test_list_adapters() -> None:
    model = _two_loras()
    model.add_adapter("c", "bitfit")
    rows = {r["name"]: r for r in model.list_adapters()}
    assert rows["a"]["method"] == "lora" and rows["a"]["active"] and not rows["a"]["merged"]
    assert rows["b"]["targets"] == ["attn.q", "attn.k", "mlp.up"] and rows["b"]["sites"] == 6
    assert rows["b"]["parameters"] == 2 * 5 * (32 + 32) * 2 + 2 * 5 * (32 + 64)
    assert rows["c"]["family"] == "selective" and not rows["c"]["active"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_cycles_are_bit_exact(dtype: torch.dtype) -> None:
    model = _two_loras(dtype=dtype)
    original = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    model.set_active(["a", "b"])
    for _ in range(5):
        model.merge()
        assert model.merged_adapters == ["a", "b"]
        model.unmerge("a")  # out of order: b stays merged
        assert model.merged_adapters == ["b"]
        model.merge("a")
        model.unmerge()
    state = model.base_model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in original.items())


def test_partial_unmerge_equals_merging_the_rest_alone() -> None:
    model = _two_loras()
    model.set_active(["a", "b"])
    model.merge()
    model.unmerge("a")
    after = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    model.unmerge()
    model.merge("b")
    state = model.base_model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in after.items())


def test_merge_refusals() -> None:
    model = _two_loras()
    with pytest.raises(MergeError, match="not active"):
        model.merge("b")
    model.merge("a")
    with pytest.warns(UserWarning, match="already merged"):
        model.merge("a")
    with pytest.raises(MergeError, match="unmerge"):
        model.set_active("b")
    with pytest.raises(MergeError, match="mixed batch"):
        model(input_ids=torch.ones(2, 3, dtype=torch.long), adapter_names=["a", "b"])


def test_delete_adapter_rules() -> None:
    model = _two_loras()
    with pytest.raises(AdapterError, match="is active"):
        model.delete_adapter("a")
    with pytest.raises(AdapterError, match="adapters on this model: a, b"):
        model.delete_adapter("zzz")
    model.delete_adapter("b")
    model.set_active([])
    model.delete_adapter("a")
    assert not list(model.deltas.parameters()) and not model.adapters
    assert all(not m._forward_hooks for m in model.base_model.modules())


@pytest.mark.parametrize("name", backbones())
def test_mixed_batch_equals_per_sample_forwards(name: str) -> None:
    bb = BACKBONES[name]
    model = _two_loras(name)
    model.eval()
    inputs = bb.sample(3)
    with torch.no_grad():
        expected = {}
        for adapter in ("a", "b"):
            model.set_active(adapter)
            expected[adapter] = bb.outputs(model, inputs)
        with model.disable():
            expected["__base__"] = bb.outputs(model, inputs)
        for names in (["b", "a"], ["__base__", "b"], ["a", "a"]):
            with model.mixed_batch(names):
                got = bb.outputs(model, inputs)
            for k, tensor in enumerate(got):
                for i, adapter in enumerate(names):
                    torch.testing.assert_close(tensor[i], expected[adapter][k][i])


def test_mixed_batch_through_forward_and_gradients() -> None:
    bb = BACKBONES["bert"]
    model = _two_loras()
    x = bb.sample(0)
    out = model(**x, adapter_names=["a", "b"]).last_hidden_state
    out.square().sum().backward()
    a_grads = [p.grad for p in model.deltas["a"].parameters()]
    b_grads = [p.grad for p in model.deltas["b"].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in a_grads + b_grads)


def test_mixed_batch_bad_input() -> None:
    bb = BACKBONES["bert"]
    model = _two_loras()
    x = bb.sample(0)
    with pytest.raises(AdapterError, match="2 entries"):
        model(**{k: v[:1] for k, v in x.items()}, adapter_names=["a", "b"])
    with pytest.raises(AdapterError, match="unknown adapter 'c'"):
        model(**x, adapter_names=["a", "c"])
    with pytest.raises(AdapterError, match="one name per sample"):
        model(**x, adapter_names="a")
    assert model._state.routing is None  # nothing left behind


def test_mixed_prompts_on_text_pad_and_mask() -> None:
    """Adapters with prompts of different lengths share a batch on a text model."""
    bb = BACKBONES["llama"]
    model = unipeft.apply(bb.make(), "prompt_tuning", num_tokens=2, adapter_name="short")
    model.add_adapter("long", "prompt_tuning", num_tokens=5)
    x = bb.sample(0)
    with torch.no_grad():
        expected = {}
        for adapter in ("short", "long"):
            model.set_active(adapter)
            expected[adapter] = model(**x).last_hidden_state
        mixed = model(**x, adapter_names=["long", "short"]).last_hidden_state
    torch.testing.assert_close(mixed[0], expected["long"][0])
    torch.testing.assert_close(mixed[1], expected["short"][1])


def test_mixed_prompts_on_vision_are_refused_clearly() -> None:
    bb = BACKBONES["timm_vit"]
    model = unipeft.apply(bb.make(), "prompt_tuning", num_tokens=2, adapter_name="p")
    with pytest.raises(ValueError, match="attention mask"):
        with model.mixed_batch(["p", "__base__"]):
            bb.outputs(model, bb.sample(0))


def test_lora_mixed_path_uses_stacked_factors_and_refreshes_them() -> None:
    """Inference reuses stacked factors; an in-place update of a factor invalidates them."""
    bb = BACKBONES["bert"]
    model = _two_loras()
    x = bb.sample(0)
    with torch.no_grad():
        first = model(**x, adapter_names=["a", "b"]).last_hidden_state
        again = model(**x, adapter_names=["a", "b"]).last_hidden_state
        assert torch.equal(first, again)
        model.deltas["a"]["encoder__layer__0:attn__q"].B.add_(1.0)
        changed = model(**x, adapter_names=["a", "b"]).last_hidden_state
        model.set_active("a")
        single = model(**x).last_hidden_state
    assert not torch.allclose(first[0], changed[0])
    torch.testing.assert_close(changed[0], single[0])
    torch.testing.assert_close(changed[1], first[1])


@pytest.mark.parametrize("method", ["bottleneck_adapter", "prompt_tuning"])
def test_active_adapters_compose_in_the_order_given_and_a_save_keeps_it(
    method: str, tmp_path
) -> None:
    """Serial deltas (and soft prompts) depend on order: ``set_active`` decides it, not the
    order of attachment, and a loaded model composes them the same way."""
    from unipeft.testing.invariants import outputs

    bb = BACKBONES["bert"]
    model = unipeft.apply(bb.make(), method)
    model.add_adapter("a", method)
    perturb(model)
    model.set_active(["a", "default"])
    first = outputs(model, bb)
    model.set_active(["default", "a"])
    second = outputs(model, bb)
    assert (first - second).abs().max() > 1e-4  # the order matters for this method
    model.set_active(["a"])
    only_a = outputs(model, bb)
    model.set_active(["a", "default"])
    assert torch.equal(outputs(model, bb), first)
    model.save(tmp_path)
    loaded = unipeft.load(bb.make(), tmp_path)
    assert loaded.active_adapters == ("a", "default")
    assert torch.equal(outputs(loaded, bb), first)
    loaded.set_active(["default", "a"])
    assert torch.equal(outputs(loaded, bb), second)
    loaded.set_active("a")
    assert torch.equal(outputs(loaded, bb), only_a)
