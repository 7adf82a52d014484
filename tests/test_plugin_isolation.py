"""Plugins are isolated at every point.

A structure map whose ``matches()`` or ``sites()`` raises is skipped and reported; it stops
no backbone. A plugin method that raises or returns the wrong type in any of its callables
fails the call with a ``PluginError`` naming it and its distribution, is reported, and
changes nothing.
"""

from __future__ import annotations

import dataclasses
import sys
import types
from importlib import metadata

import pytest
import torch
from _state import fingerprint
from torch import nn

import unipeft
from unipeft import PluginError
from unipeft.methods.reparameterized import lora
from unipeft.runtime.registry import build_registry
from unipeft.testing.backbones import BACKBONES


class _BrokenMap:
    name = "broken"
    priority = 50  # asked before every built-in map

    def matches(self, model: torch.nn.Module) -> bool:
        raise RuntimeError("this map cannot look at models")

    def sites(self, model: torch.nn.Module) -> list:
        raise AssertionError("never reached")


@pytest.fixture
def broken_plugin():
    module = types.ModuleType("fake_broken_map")

    @unipeft.hookimpl
    def register_backbones(register):  # type: ignore[no-untyped-def]
        register(_BrokenMap())

    module.register_backbones = register_backbones
    sys.modules[module.__name__] = module
    ep = metadata.EntryPoint("broken", module.__name__, "unipeft")
    yield [ep]
    sys.modules.pop(module.__name__, None)


@pytest.mark.parametrize("name", ["bert", "timm_vit", "open_clip"])
def test_a_raising_map_is_skipped_and_reported(broken_plugin, name: str) -> None:
    reg = build_registry(broken_plugin, strict=False)
    assert not reg.failures
    bb = BACKBONES[name]
    with pytest.warns(RuntimeWarning, match="structure map 'broken'.*raised in matches"):
        model = unipeft.DeltaModel(bb.make(), _registry=reg)
        model.add_adapter("a", "lora", r=2)
    assert model.structure_map != "broken"
    assert len(model.adapters["a"].sites) > 0
    (failure,) = reg.failures
    assert failure.stage == "matches (broken)" and "cannot look at models" in failure.error
    assert failure.plugin == "broken"
    model.add_adapter("b", "lora", r=2)  # reported once, not on every call
    assert len(reg.failures) == 1


def test_strict_mode_raises_naming_the_map_and_its_plugin(broken_plugin) -> None:
    reg = build_registry(broken_plugin, strict=True)
    backbone = BACKBONES["bert"].make()
    with pytest.raises(PluginError, match=r"structure map 'broken' from .*plugin 'broken'"):
        unipeft.DeltaModel(backbone, _registry=reg).add_adapter("a", "lora", r=2)
    assert not any(m._forward_hooks for m in backbone.modules())


def test_without_a_registry_the_error_names_the_map() -> None:
    from unipeft.runtime.targets import pick_map

    with pytest.raises(PluginError, match="structure map 'broken' raised in matches"):
        pick_map(BACKBONES["bert"].make(), [_BrokenMap()])


# ------------------------------------------------------------------ every other point
# A plugin's map may fail in sites(), its method in build(), accepts(), size_check(),
# default_targets(), num_parameters() or its delta's link(): each time the error names the
# method or map and its distribution, the failure is reported, the model is unchanged and
# the other methods and maps keep working.

DIST = "unipeft-fake-broken"


class _Dist:
    def __init__(self, name: str) -> None:
        self.name = name


def _entry_point(name: str, module: str) -> metadata.EntryPoint:
    ep = metadata.EntryPoint(name=name, value=module, group="unipeft")
    object.__setattr__(ep, "dist", _Dist(DIST))  # as importlib attaches it
    return ep


def _boom(*args, **kwargs):
    raise RuntimeError("the plugin fell over")


class _LinkFails(lora.LoraDelta):
    @staticmethod
    def link(attachments: list) -> None:
        raise RuntimeError("the plugin fell over")


def _base_method(method_id: str, **changes) -> unipeft.Method:
    fields = dict(
        id=method_id,
        family="reparameterized",
        config=lora.LoraConfig,
        build=lora.METHOD.build,
        num_parameters=lora.METHOD.num_parameters,
        formula="r·(d_in+d_out)",
        site_kinds=("projection",),
        default_targets=("attn.q",),
        mergeable=True,
        identity_at_init=True,
        paper="test",
    )
    fields.update(changes)
    return unipeft.Method(**fields)


BROKEN_METHODS = {
    "build_raises": ("build", dict(build=_boom)),
    "build_returns_a_linear": ("build", dict(build=lambda cfg, site: nn.Linear(2, 2))),
    "build_returns_none": ("build", dict(build=lambda cfg, site: None)),
    "accepts_raises": ("accepts", dict(accepts=_boom)),
    "accepts_returns_an_int": ("accepts", dict(accepts=lambda cfg, site: 3)),
    "size_check_raises": ("size_check", dict(size_check=_boom)),
    "size_check_returns_a_list": ("size_check", dict(size_check=lambda cfg, site: ["no"])),
    "default_targets_raises": ("default_targets", dict(default_targets=_boom)),
    "default_targets_returns_an_int": ("default_targets", dict(default_targets=lambda cfg: 5)),
    "link_raises": (
        "link",
        dict(build=lambda cfg, site: _LinkFails.from_config(cfg, unipeft.ProjectionShape.of(site))),
    ),
}


@pytest.fixture
def method_plugin():
    made: list[str] = []

    def make(key: str, *, strict: bool = False):
        changes = BROKEN_METHODS[key][1]
        module = types.ModuleType(f"fake_broken_method_{key}")
        method = _base_method(f"bad_{key}", **changes)

        @unipeft.hookimpl
        def register_methods(register):  # type: ignore[no-untyped-def]
            register(method)

        module.register_methods = register_methods
        sys.modules[module.__name__] = module
        made.append(module.__name__)
        return build_registry([_entry_point("brokenmethod", module.__name__)], strict=strict)

    yield make
    for name in made:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])
@pytest.mark.parametrize("key", list(BROKEN_METHODS))
def test_a_failing_plugin_method_is_named_and_changes_nothing(method_plugin, key, strict) -> None:
    stage = BROKEN_METHODS[key][0]
    reg = method_plugin(key, strict=strict)
    assert not reg.failures
    model = unipeft.DeltaModel(BACKBONES["bert"].make(), _registry=reg)
    model.add_adapter("first", "lora", r=2)
    before = fingerprint(model)
    with pytest.raises(PluginError) as info:
        model.add_adapter("second", f"bad_{key}")
    msg = str(info.value)
    assert f"'bad_{key}'" in msg and DIST in msg and f"{stage}()" in msg
    assert fingerprint(model) == before
    (failure,) = reg.failures
    assert failure.distribution == DIST and failure.plugin == "brokenmethod"
    assert failure.stage == f"{stage} (bad_{key})"
    model.add_adapter("third", "lora", r=2)  # the other methods keep working
    assert "third" in model.adapters


@pytest.mark.parametrize(
    "count",
    [_boom, lambda cfg, site: "many", lambda cfg, site: -1, lambda cfg, site: True],
    ids=["raises", "returns_a_str", "returns_negative", "returns_a_bool"],
)
def test_a_failing_num_parameters_is_named(count) -> None:
    from unipeft.runtime.isolation import guard_method

    reg = build_registry([], strict=False)
    method = guard_method(_base_method("bad_count", num_parameters=count), reg.method_failed)
    site = next(s for s in unipeft.inspect_sites(BACKBONES["bert"].make()) if s.role == "attn.q")
    cfg = method.config.parse(method.id, {"r": 2})
    with pytest.raises(PluginError, match=r"'bad_count'.*num_parameters\(\)"):
        method.num_parameters(cfg, site)
    assert [f.stage for f in reg.failures] == ["num_parameters (bad_count)"]


def test_builtin_methods_are_not_wrapped() -> None:
    reg = build_registry([], strict=False)
    assert reg.methods["lora"].build is lora.METHOD.build
    assert dataclasses.replace(reg.methods["lora"], distribution="") == lora.METHOD


class _SitesRaise(_BrokenMap):
    name = "sites_raise"

    def matches(self, model: torch.nn.Module) -> bool:
        return True

    def sites(self, model: torch.nn.Module) -> list:
        raise RuntimeError("this map cannot list sites")


class _SitesWrongType(_SitesRaise):
    name = "sites_wrong_type"

    def sites(self, model: torch.nn.Module) -> list:
        return ["encoder.layer.0.attention.self.query"]


class _SitesNotAList(_SitesRaise):
    name = "sites_not_a_list"

    def sites(self, model: torch.nn.Module) -> list:
        return 5  # type: ignore[return-value]


@pytest.fixture
def sites_plugin():
    made: list[str] = []

    def make(smap) -> list[metadata.EntryPoint]:
        module = types.ModuleType(f"fake_map_{smap.name}")

        @unipeft.hookimpl
        def register_backbones(register):  # type: ignore[no-untyped-def]
            register(smap)

        module.register_backbones = register_backbones
        sys.modules[module.__name__] = module
        made.append(module.__name__)
        return [_entry_point(smap.name, module.__name__)]

    yield make
    for name in made:
        sys.modules.pop(name, None)


MAPS = [_SitesRaise(), _SitesWrongType(), _SitesNotAList()]


@pytest.mark.parametrize("smap", MAPS, ids=[m.name for m in MAPS])
def test_a_map_failing_in_sites_is_skipped_and_reported(sites_plugin, smap) -> None:
    reg = build_registry(sites_plugin(smap), strict=False)
    with pytest.warns(RuntimeWarning, match=rf"structure map '{smap.name}'.*raised in sites"):
        model = unipeft.DeltaModel(BACKBONES["bert"].make(), _registry=reg)
        model.add_adapter("a", "lora", r=2)
    assert model.structure_map == "transformers-bert"
    (failure,) = reg.failures
    assert failure.stage == f"sites ({smap.name})" and failure.distribution == DIST
    assert reg.pick_map(BACKBONES["gpt2"].make()).name == "transformers-gpt2"


@pytest.mark.parametrize("smap", MAPS, ids=[m.name for m in MAPS])
def test_a_map_failing_in_sites_raises_in_strict_mode(sites_plugin, smap) -> None:
    reg = build_registry(sites_plugin(smap), strict=True)
    backbone = BACKBONES["bert"].make()
    before = fingerprint(backbone)
    with pytest.raises(PluginError, match=rf"structure map '{smap.name}' from {DIST}.*sites\(\)"):
        unipeft.DeltaModel(backbone, _registry=reg).add_adapter("a", "lora", r=2)
    assert fingerprint(backbone) == before
