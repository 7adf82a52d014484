"""Discovery through entry points, tested with fake ``importlib.metadata`` entries."""

from __future__ import annotations

import sys
import types
from importlib import metadata

import pytest

import unipeft
from unipeft import DeltaConfig, Method, PluginError
from unipeft.methods import lora
from unipeft.runtime.registry import build_registry


class _Dist:
    def __init__(self, name: str) -> None:
        self.name = name


def _entry_point(name: str, module: str, dist: str) -> metadata.EntryPoint:
    ep = metadata.EntryPoint(name=name, value=module, group="unipeft")
    # EntryPoint is immutable; its dist is attached the way importlib does it
    object.__setattr__(ep, "dist", _Dist(dist))
    return ep


def _plugin_module(name: str, body: dict) -> str:
    module = types.ModuleType(name)
    module.__dict__.update(body)
    sys.modules[name] = module
    return name


def _method(method_id: str) -> Method:
    return Method(
        id=method_id,
        family=lora.METHOD.family,
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


@pytest.fixture
def fake_plugins():
    made: list[str] = []

    def make(name: str, **hooks) -> str:
        made.append(name)
        return _plugin_module(name, hooks)

    yield make
    for name in made:
        sys.modules.pop(name, None)


def _register_methods(*methods: Method):
    @unipeft.hookimpl
    def register_methods(register):
        for m in methods:
            register(m)

    return register_methods


def test_builtins_register_through_the_entry_point() -> None:
    eps = metadata.entry_points(group="unipeft")
    assert "unipeft._builtin" in {ep.value for ep in eps}
    ids = {m.id for m in unipeft.list_methods()}
    assert {"lora", "bottleneck_adapter", "prompt_tuning", "bitfit", "unipelt", "moe_lora"} <= ids
    families = {m.family for m in unipeft.list_methods() if m.distribution == "unipeft"}
    assert families == {"additive", "selective", "reparameterized", "hybrid", "moe"}


def test_third_party_method_is_discovered(fake_plugins) -> None:
    mod = fake_plugins("fake_good", register_methods=_register_methods(_method("fake_lora")))
    reg = build_registry([_entry_point("good", mod, "unipeft-fake")], strict=False)
    assert reg.methods["fake_lora"].distribution == "unipeft-fake"
    assert "lora" in reg.methods  # built-ins are still there
    assert not reg.failures


def test_failing_import_is_reported_and_others_keep_working(fake_plugins) -> None:
    good = fake_plugins("fake_good2", register_methods=_register_methods(_method("fake_two")))
    eps = [
        _entry_point("broken", "no_such_module_for_unipeft", "unipeft-broken"),
        _entry_point("good", good, "unipeft-good"),
    ]
    reg = build_registry(eps, strict=False)
    assert "fake_two" in reg.methods
    [failure] = reg.failures
    assert (failure.plugin, failure.distribution, failure.stage) == (
        "broken",
        "unipeft-broken",
        "import",
    )
    assert "ModuleNotFoundError" in failure.error


def test_raising_hook_is_reported(fake_plugins) -> None:
    @unipeft.hookimpl
    def register_methods(register):
        raise RuntimeError("boom")

    mod = fake_plugins("fake_raises", register_methods=register_methods)
    reg = build_registry([_entry_point("raises", mod, "unipeft-raises")], strict=False)
    [failure] = reg.failures
    assert failure.distribution == "unipeft-raises" and failure.stage == "register_methods"
    assert "boom" in failure.error
    assert "lora" in reg.methods


def test_strict_mode_turns_failures_into_errors(fake_plugins, monkeypatch) -> None:
    eps = [_entry_point("broken", "no_such_module_for_unipeft", "unipeft-broken")]
    monkeypatch.setenv("UNIPEFT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="unipeft-broken"):
        build_registry(eps)
    monkeypatch.setenv("UNIPEFT_STRICT_PLUGINS", "0")
    assert build_registry(eps).failures


def test_duplicate_method_ids_name_both_sources(fake_plugins) -> None:
    mod = fake_plugins("fake_dup", register_methods=_register_methods(_method("lora")))
    with pytest.raises(PluginError) as info:
        build_registry([_entry_point("dup", mod, "unipeft-dup")], strict=False)
    message = str(info.value)
    assert (
        "'lora'" in message and "unipeft-dup" in message and "unipeft (plugin 'builtin')" in message
    )


def test_third_party_structure_map(fake_plugins) -> None:
    from torch import nn

    from unipeft.maps import BlockLayout, LayoutMap, Tower

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wq = nn.Linear(8, 8)
            self.wo = nn.Linear(8, 8)

        def forward(self, x):
            return x + self.wo(self.wq(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stack = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for b in self.stack:
                x = b(x)
            return x

    smap = LayoutMap(
        name="toy",
        towers=(Tower(r"stack"),),
        layout=BlockLayout(projections={"attn.q": "wq", "attn.out": "wo"}, sublayers={}),
    )

    @unipeft.hookimpl
    def register_backbones(register):
        register(smap)

    mod = fake_plugins("fake_map", register_backbones=register_backbones)
    reg = build_registry([_entry_point("toy", mod, "unipeft-toy")], strict=False)
    assert reg.map_sources["toy"].startswith("unipeft-toy")
    model = unipeft.DeltaModel(Net(), _registry=reg)
    adapter = model.add_adapter("a", "lora", targets=["attn.q[1]"], r=2)
    assert [s.name for s in adapter.sites] == ["stack.1:attn.q"]


def test_method_record_rejects_bad_definitions() -> None:
    with pytest.raises(ValueError, match="family"):
        Method(**{**_method("x").__dict__, "family": "other"})  # type: ignore[arg-type]

    class NotAConfig:
        pass

    with pytest.raises(TypeError, match="DeltaConfig"):
        Method(**{**_method("x").__dict__, "config": NotAConfig})  # type: ignore[arg-type]
    assert issubclass(lora.LoraConfig, DeltaConfig)


def test_list_methods_describes_each_method() -> None:
    info = {m.id: m.describe() for m in unipeft.list_methods()}
    lora_info = info["lora"]
    assert lora_info["family"] == "reparameterized"
    assert lora_info["mergeable"] is True and lora_info["identity_at_init"] is True
    assert lora_info["site_kinds"] == ["projection"]
    assert "r ·" in lora_info["formula"] and "2106.09685" in lora_info["paper"]
    assert lora_info["distribution"] == "unipeft"
    assert set(lora_info["fields"]) == {"r", "alpha", "dropout", "use_rslora", "init"}
    assert info["unipelt"]["identity_at_init"] == "depends on config"
    assert unipeft.plugin_manager().get_plugin("builtin") is not None


def test_config_fields_must_be_described() -> None:
    class Bare(DeltaConfig):
        r: int = 4

    with pytest.raises(ValueError, match=r"fields \['r'\] need a description"):
        Method(**{**_method("x").__dict__, "config": Bare})


def test_register_plugin_in_process(fake_plugins) -> None:
    import unipeft.runtime.registry as plugins

    mod = types.ModuleType("inproc")
    mod.register_methods = _register_methods(_method("inproc_lora"))
    try:
        unipeft.register_plugin(mod)
        info = unipeft.get_method("inproc_lora")
        assert info.distribution == "<in-process>"
        with pytest.raises(PluginError, match="already registered"):
            unipeft.register_plugin(mod)
    finally:
        plugins._IN_PROCESS.clear()
        unipeft.reset_registry()
    with pytest.raises(PluginError, match="unknown method 'inproc_lora'"):
        unipeft.get_method("inproc_lora")


def test_explicit_empty_targets_is_an_error() -> None:
    from unipeft.testing.backbones import BACKBONES

    with pytest.raises(unipeft.TargetError, match="targets is empty"):
        unipeft.apply(BACKBONES["bert"].make(), "lora", targets=[])
