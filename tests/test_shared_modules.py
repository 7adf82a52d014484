"""An adapter's shared module (Method.shared): built once, trained and counted once, saved
once, merged per site, and its after_backward called once per backward pass in any loop."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pydantic import Field
from safetensors.torch import load_file
from torch import nn

import unipeft
from unipeft import AdapterError, DeltaConfig, Method, ProjectionShape, ReparameterizedDelta
from unipeft.features.arithmetic import combine
from unipeft.testing.backbones import BACKBONES


class ToyConfig(DeltaConfig):
    r: int = Field(2, ge=1, le=16, description="rank of the shared projection")


class Bank(nn.Module):
    """A frozen random projection (a buffer) and a trained bank, shared by every site."""

    def __init__(self, r: int, d_in: int, d_out: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.register_buffer("A", torch.randn(r, d_in, generator=g) / math.sqrt(d_in))
        self.bank = nn.Parameter(torch.randn(d_out, r, generator=g) * 0.1)
        self.calls: list[int] = []

    def after_backward(self, deltas) -> None:
        self.calls.append(sum(d.scale.grad is not None for d in deltas.values()))


class ToyDelta(ReparameterizedDelta):
    def __init__(self, shape: ProjectionShape, shared: Bank, r: int) -> None:
        super().__init__(shape)
        self.use_shared(shared)
        self.scale = nn.Parameter(torch.zeros(r))

    def delta_weight(self) -> torch.Tensor:
        bank, a = self.shared.bank, self.shared.A
        out, inp = self.shape.out_features, self.shape.in_features
        return bank[:out] @ (self.scale[:, None] * a[:, :inp])


def _shared(cfg: ToyConfig, sites) -> Bank:
    return Bank(cfg.r, max(s.weight.in_features for s in sites), max(s.features for s in sites))


TOY = Method(
    id="toy_shared",
    family="reparameterized",
    config=ToyConfig,
    build=lambda cfg, site, shared: ToyDelta(ProjectionShape.of(site), shared, cfg.r),
    num_parameters=lambda cfg, site: cfg.r,
    formula="r per site, plus d_out_max · r shared",
    site_kinds=("projection",),
    default_targets=("attn.q", "attn.v"),
    mergeable=True,
    identity_at_init=True,
    paper="a test method",
    shared=_shared,
    shared_parameters=lambda cfg, sites: max(s.features for s in sites) * cfg.r,
)


class _Plugin:
    @unipeft.hookimpl
    def register_methods(self, register) -> None:
        register(TOY)


@pytest.fixture(autouse=True)
def toy_registered():
    from unipeft.runtime import registry as plugins

    unipeft.register_plugin(_Plugin(), "toy-shared")
    yield
    plugins._IN_PROCESS[:] = [e for e in plugins._IN_PROCESS if e[0] != "toy-shared"]
    unipeft.reset_registry()


def bert() -> nn.Module:
    return BACKBONES["bert"].make()


def ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))


def test_one_shared_module_counted_once() -> None:
    model = unipeft.apply(bert(), "toy_shared", r=3)
    adapter = model.get_adapter("default")
    shared = adapter.shared
    assert isinstance(shared, Bank) and model.deltas["default"]["__shared__"] is shared
    assert all(d.shared is shared for d in (adapter.delta_at(s) for s in adapter.sites))
    want = sum(TOY.num_parameters(adapter.config, s) for s in adapter.sites)
    want += TOY.count_shared(adapter.config, tuple(adapter.sites))
    assert model.num_trainable_parameters() == adapter.num_parameters() == want
    # the shared tensors are not part of any delta's own state
    assert all(set(adapter.delta_at(s).state_dict()) == {"scale"} for s in adapter.sites)


def test_saved_once_loaded_exactly(tmp_path: Path) -> None:
    base = bert()
    model = unipeft.apply(base, "toy_shared", r=3)
    with torch.no_grad():
        for p in model.deltas.parameters():
            p.normal_()
    want = model(input_ids=ids()).last_hidden_state
    model.save(str(tmp_path))
    keys = sorted(load_file(tmp_path / "unipeft_adapters.safetensors"))
    shared = [k for k in keys if "::__shared__::" in k]
    assert shared == ["default::__shared__::toy_shared.A", "default::__shared__::toy_shared.bank"]
    assert len(keys) == 2 + len(model.get_adapter("default").sites)
    fresh = bert()
    fresh.load_state_dict(model.unload().state_dict())
    loaded = unipeft.load(fresh, str(tmp_path))
    assert torch.equal(loaded(input_ids=ids()).last_hidden_state, want)
    bank = loaded.get_adapter("default").shared
    assert (
        loaded.get_adapter("default").delta_at(loaded.get_adapter("default").sites[0]).shared
        is bank
    )


def test_merge_per_site_with_shared_tensors() -> None:
    model = unipeft.apply(bert(), "toy_shared", r=3)
    with torch.no_grad():
        for p in model.deltas.parameters():
            p.normal_()
    want = model(input_ids=ids()).last_hidden_state
    model.merge()
    assert torch.allclose(model(input_ids=ids()).last_hidden_state, want, atol=1e-5)
    model.unmerge()


def test_after_backward_once_per_pass_in_training_only() -> None:
    model = unipeft.apply(bert(), "toy_shared", r=3)
    bank = model.get_adapter("default").shared
    n_sites = len(model.get_adapter("default").sites)
    model.train()
    for _ in range(2):  # two micro-batches, gradients accumulate
        model(input_ids=ids()).last_hidden_state.pow(2).mean().backward()
    assert bank.calls == [n_sites, n_sites]  # at the end of each pass, every grad present
    model.eval()
    model(input_ids=ids()).last_hidden_state.pow(2).mean().backward()
    assert len(bank.calls) == 2  # not in eval mode
    model.train()
    model.set_active([])
    with pytest.raises(RuntimeError):  # nothing requires grad: the backbone is frozen
        model(input_ids=ids()).last_hidden_state.pow(2).mean().backward()
    assert len(bank.calls) == 2
    model.set_active(["default"])
    model.add_adapter("other", "lora", r=2)
    model.set_active(["other"])
    model.delete_adapter("default")  # its hooks go with it
    model(input_ids=ids()).last_hidden_state.pow(2).mean().backward()
    assert len(bank.calls) == 2


def test_combine_refuses_parameter_averaging_of_shared_tensors() -> None:
    model = unipeft.apply(bert(), "toy_shared", r=3)
    model.add_adapter("b", "toy_shared", r=3)
    with pytest.raises(AdapterError, match=r"shared by all its sites.*how='svd'"):
        combine(model, {"default": 0.5, "b": 0.5}, "ab")
    assert list(model.adapters) == ["default", "b"]
    combine(model, {"default": 0.5, "b": 0.5}, "ab", how="svd")
    assert model.get_adapter("ab").method.id == "lora"


def test_the_kit_passes_on_the_toy_method() -> None:
    from unipeft.testing.runner import check

    for invariant in ("trainable_count", "save_load_roundtrip", "merge_roundtrip"):
        check(TOY, BACKBONES["bert"], invariant)
