"""A structure map whose matches() raises is skipped and reported; it stops no backbone."""

from __future__ import annotations

import sys
import types
from importlib import metadata

import pytest
import torch

import unipeft
from unipeft import PluginError
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
