"""The one way in: AdapterPlan and DeltaModel.attach, the building blocks, old import paths."""

from __future__ import annotations

import importlib
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn

import unipeft
from unipeft.blocks import LowRankConfig, LowRankDelta, low_rank_factors, low_rank_scaling
from unipeft.contract.fastpath import FastPath
from unipeft.testing.backbones import BACKBONES


def _snapshot(model: unipeft.DeltaModel) -> dict:
    base = model.base_model
    return {
        "state": {k: v.detach().clone() for k, v in base.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in base.named_parameters()},
        "adapters": dict(model.adapters),
        "active": model.active_adapters,
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.modules()),
        "forwards": sum("forward" in m.__dict__ for m in base.modules()),
        "deltas": list(model.deltas),
    }


def _same(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    for key in ("grad", "adapters", "active", "hooks", "forwards", "deltas"):
        assert before[key] == after[key], key


def test_an_importer_written_with_public_names_only() -> None:
    """Tensors from elsewhere (here: another model's LoRA) enter through a plan."""
    bb = BACKBONES["bert"]
    source = unipeft.apply(bb.make(), "lora", r=4, targets=["attn.q"])
    with torch.no_grad():
        for att in source.adapters["default"].attachments:
            att.delta.B.normal_()
    tensors = {
        s.name: source.adapters["default"].delta_at(s).state_dict()
        for s in source.adapters["default"].sites
    }

    backbone = bb.make()
    spec = unipeft.get_method("lora")
    sites = tuple(s for s in unipeft.inspect_sites(backbone) if s.name in tensors)
    plan = unipeft.AdapterPlan(
        method=spec, config=spec.config.parse(spec.id, {"r": 4}), sites=sites, state=tensors
    )
    model = unipeft.DeltaModel(backbone)
    model.attach("imported", plan)
    x = bb.sample(0)
    with torch.no_grad():
        torch.testing.assert_close(bb.run(model, x), bb.run(source, x), atol=0, rtol=0)
    assert model.active_adapters == ("imported",)


def test_attach_keeps_the_rng_when_tensors_are_given() -> None:
    bb = BACKBONES["llama"]
    model = unipeft.DeltaModel(bb.make())
    plan = model.plan("lora", r=2)
    state = {
        s.name: dict(LowRankDelta(unipeft.ProjectionShape.of(s), 2, 4.0).state_dict())
        for s in plan.sites
    }
    given = unipeft.AdapterPlan(plan.method, plan.config, plan.sites, plan.targets, state)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    model.attach("a", given)
    assert torch.equal(torch.rand(3), expected)


def test_a_plan_attaches_only_to_the_model_it_was_made_for() -> None:
    """A plan's sites are modules of one backbone: attached to another model, they would
    hook that backbone instead. Refused, and nothing changes."""
    bb = BACKBONES["bert"]
    plan = unipeft.DeltaModel(bb.make()).plan("lora", r=2)
    other = unipeft.DeltaModel(bb.make())
    before = _snapshot(other)
    with pytest.raises(unipeft.TargetError, match="belongs to another model"):
        other.attach("a", plan)
    _same(before, _snapshot(other))
    assert not any(m._forward_hooks for m in plan.sites[0].module.modules())


def test_plan_validates_itself() -> None:
    spec = unipeft.get_method("lora")
    other = unipeft.get_method("bitfit")
    site = unipeft.inspect_sites(BACKBONES["bert"].make())[0]
    with pytest.raises(TypeError, match="takes a LoraConfig"):
        unipeft.AdapterPlan(spec, other.config.parse(other.id, {}), (site,))
    cfg = spec.config.parse(spec.id, {})
    with pytest.raises(ValueError, match="more than once"):
        unipeft.AdapterPlan(spec, cfg, (site, site))
    with pytest.raises(ValueError, match="not among its sites"):
        unipeft.AdapterPlan(spec, cfg, (site,), state={"nowhere": {}})


@pytest.mark.parametrize(
    "bad, match",
    [
        (
            {"A": torch.zeros(4, 32)},
            r"are \['A'\], but method 'lora' builds a delta there with \['A', 'B'\]",
        ),
        (
            {"A": torch.zeros(4, 31), "B": torch.zeros(32, 4)},
            r"'A' given for site .* has shape \(4, 31\)",
        ),
    ],
)
def test_a_bad_state_is_refused_before_anything_changes(bad: dict, match: str) -> None:
    bb = BACKBONES["bert"]
    model = unipeft.apply(bb.make(), "lora", r=4, targets=["attn.q"])
    plan = model.plan("lora", r=4, targets=["attn.v"])
    states = {s.name: {"A": torch.zeros(4, 32), "B": torch.zeros(32, 4)} for s in plan.sites}
    states[plan.sites[-1].name] = bad
    before = _snapshot(model)
    with pytest.raises(unipeft.AdapterError, match=match):
        model.attach("b", unipeft.AdapterPlan(plan.method, plan.config, plan.sites, state=states))
    _same(before, _snapshot(model))


def test_a_failure_halfway_through_hooking_leaves_the_model_as_it_was(monkeypatch) -> None:
    from unipeft.runtime.hosts import HostTable

    bb = BACKBONES["timm_vit"]
    model = unipeft.apply(bb.make(), "lora", r=2)
    before = _snapshot(model)
    real = HostTable.add
    calls = []

    def flaky(self, att):  # type: ignore[no-untyped-def]
        calls.append(att)
        if len(calls) == 3:
            raise RuntimeError("boom")
        real(self, att)

    monkeypatch.setattr(HostTable, "add", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        model.add_adapter("b", "lora", r=2, targets=["attn.q", "attn.v", "mlp.up"])
    monkeypatch.undo()
    assert len(calls) == 3
    _same(before, _snapshot(model))
    with torch.no_grad():
        fresh = unipeft.apply(bb.make(), "lora", r=2)
        fresh.load_state_dict(model.state_dict())
        x = bb.sample(1)
        torch.testing.assert_close(bb.run(model, x), bb.run(fresh, x), atol=0, rtol=0)


def test_a_refusal_by_accepts_says_why_not_which_kinds() -> None:
    backbone = BACKBONES["open_clip"].make()
    with pytest.raises(unipeft.TargetError) as info:
        unipeft.apply(backbone, "moe_lora", targets=[r"visual\.conv1"])
    text = str(info.value)
    assert "is a convolution" in text and "Choose targets this method accepts" in text
    assert "kinds it accepts" not in text
    with pytest.raises(unipeft.TargetError, match="kinds it accepts: projection"):
        unipeft.apply(BACKBONES["bert"].make(), "lora", targets=["tokens"])


class _CountingLowRank(LowRankDelta):
    """A low-rank delta with the FastPath protocol, counting the fused calls it gets."""

    calls: ClassVar[dict[str, int]] = {}

    def update_(self, x: Tensor | None, y: Tensor) -> Tensor:
        self.calls["update_"] = self.calls.get("update_", 0) + 1
        return self(x, y)

    def fused_linear(self, x, weight, bias, transposed):  # type: ignore[no-untyped-def]
        self.calls["fused_linear"] = self.calls.get("fused_linear", 0) + 1
        return None

    @staticmethod
    def update_slices(deltas, slices, x, y):  # type: ignore[no-untyped-def]
        return None

    @staticmethod
    def link(attachments):  # type: ignore[no-untyped-def]
        _CountingLowRank.calls["link"] = len(attachments)

    @staticmethod
    def mixed(deltas, x, y, slots, cache):  # type: ignore[no-untyped-def]
        return None


def test_fast_path_is_an_opt_in_protocol() -> None:
    assert isinstance(_CountingLowRank(unipeft.ProjectionShape(4, 4), 2, 2.0), FastPath)
    assert not isinstance(LowRankDelta(unipeft.ProjectionShape(4, 4), 2, 2.0), FastPath)
    loha = unipeft.apply(BACKBONES["bert"].make(), "loha", r=2)
    assert not any(isinstance(a.delta, FastPath) for a in loha.adapters["default"].attachments)
    dora = unipeft.apply(BACKBONES["bert"].make(), "dora", r=2)  # its fused node and mixed kernels
    assert all(a.fast is a.delta for a in dora.adapters["default"].attachments)
    lora = unipeft.apply(BACKBONES["bert"].make(), "lora", r=2)
    assert all(a.fast is a.delta for a in lora.adapters["default"].attachments)
    bb = BACKBONES["llama"]
    plain = unipeft.apply(bb.make(), "lora", r=2, targets=["attn.q", "attn.v"])
    backbone = bb.make()
    plan = unipeft.DeltaModel(backbone).plan("lora", r=2, targets=["attn.q", "attn.v"])
    spec = plan.method
    counting = unipeft.Method(
        **{
            **spec.__dict__,
            "id": "counting",
            "build": lambda c, s: _CountingLowRank.from_config(c, unipeft.ProjectionShape.of(s)),
        }
    )
    _CountingLowRank.calls = {}
    model = unipeft.DeltaModel(backbone)
    model.attach("c", unipeft.AdapterPlan(counting, plan.config, plan.sites))
    assert _CountingLowRank.calls == {"link": len(plan.sites)}
    model.load_state_dict(plain.state_dict(), strict=False)
    x = bb.sample(0)
    with torch.no_grad():
        out = bb.run(model, x)
    assert _CountingLowRank.calls["fused_linear"] == len(plan.sites)  # offered, declined
    assert _CountingLowRank.calls["update_"] == len(plan.sites)  # the plain path then ran
    with torch.no_grad():
        torch.testing.assert_close(out, bb.run(plain, x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("conv", [False, True])
def test_low_rank_delta_is_s_b_a(conv: bool) -> None:
    torch.manual_seed(0)
    if conv:
        shape = unipeft.ProjectionShape(3, 5, "conv", (3, 3), {"padding": 1})
        x, y = torch.randn(2, 3, 6, 6), torch.randn(2, 5, 6, 6)
    else:
        shape = unipeft.ProjectionShape(3, 5)
        x, y = torch.randn(2, 7, 3), torch.randn(2, 7, 5)
    delta = LowRankDelta(shape, 2, 6.0, use_rslora=True)
    with torch.no_grad():
        delta.B.normal_()
    assert delta.scaling == pytest.approx(6.0 / 2**0.5) == low_rank_scaling(6.0, 2, True)
    expected = y + shape.project(x, delta.delta_weight())
    torch.testing.assert_close(delta(x, y), expected, atol=1e-5, rtol=1e-5)
    a, b = low_rank_factors(shape, 2, "orthogonal")
    assert b.abs().sum() == 0 and a.shape == (2, 3, *shape.kernel_size)
    cfg = LowRankConfig(r=3)
    assert LowRankDelta.from_config(cfg, shape).r == 3


@pytest.mark.parametrize(
    "old, name",
    [
        ("unipeft.delta", "DeltaModule"),
        ("unipeft.sites", "ModuleSite"),
        ("unipeft.config", "DeltaConfig"),
        ("unipeft.registry", "Method"),
        ("unipeft.errors", "UnipeftError"),
        ("unipeft.hookspecs", "hookimpl"),
        ("unipeft.arithmetic", "combine"),
        ("unipeft.budget", "plan_budget"),
        ("unipeft.interop.peft", "load"),
        ("unipeft.maps", "LayoutMap"),
        ("unipeft.methods.lora", "LoraDelta"),
        ("unipeft.methods.dora", "DoraDelta"),
        ("unipeft.methods.bitfit", "METHOD"),
        ("unipeft.methods.prompt_tuning", "PromptTuningDelta"),
    ],
)
def test_the_0_1_import_paths_still_work(old: str, name: str) -> None:
    assert hasattr(importlib.import_module(old), name)


def test_every_readme_name_is_public() -> None:
    for name in unipeft.__all__:
        assert hasattr(unipeft, name), name
    assert unipeft.registry().method("lora").id == "lora"  # the function, not the alias
    assert isinstance(unipeft.delta, type(unipeft))  # and the module alias
    assert nn.Module in unipeft.DeltaModule.__mro__


def test_the_hosts_fast_path_lookup_follows_the_protocol() -> None:
    from unipeft.runtime import state

    members = {n for n in vars(FastPath) if not n.startswith("_")}
    assert set(state._FAST_MEMBERS) == members
    assert state._has_fast_path(_CountingLowRank) and not state._has_fast_path(LowRankDelta)
