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
    assert set(lora_info["fields"]) == {
        "r",
        "alpha",
        "dropout",
        "use_rslora",
        "init",
        "loraplus_lr_ratio",
    }
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


# ------------------------------------------------------------------ hooks that do not exist


def test_misspelled_hook_is_a_failure_naming_the_known_hooks(fake_plugins, monkeypatch) -> None:
    @unipeft.hookimpl
    def register_method(register):  # the hook is register_methods
        raise AssertionError("an unknown hook is never called")

    mod = fake_plugins(
        "fake_typo",
        register_method=register_method,
        register_methods=_register_methods(_method("typo_lora")),
    )
    eps = [_entry_point("typo", mod, "unipeft-typo")]
    reg = build_registry(eps, strict=False)
    [failure] = reg.failures
    assert (failure.plugin, failure.distribution, failure.stage) == (
        "typo",
        "unipeft-typo",
        "check_pending",
    )
    assert "unknown hook 'register_method'" in failure.error
    assert "Did you mean 'register_methods'?" in failure.error
    for hook in ("register_methods", "register_backbones", "register_tiny_backbones"):
        assert hook in failure.error
    assert "typo_lora" in reg.methods  # the plugin's real hooks still ran

    monkeypatch.setenv("UNIPEFT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"typo \(unipeft-typo\) at check_pending"):
        build_registry(eps)


def test_an_optional_hook_of_a_newer_unipeft_is_not_reported(fake_plugins) -> None:
    @unipeft.hookimpl(optionalhook=True)
    def register_things_of_the_future(register):
        raise AssertionError("never called")

    mod = fake_plugins("fake_future", register_things_of_the_future=register_things_of_the_future)
    assert not build_registry([_entry_point("future", mod, "unipeft-future")], strict=True).failures


# ------------------------------------------------------------------ UNIPEFT_LOAD_PLUGINS


def _two_plugins(fake_plugins) -> list[metadata.EntryPoint]:
    a = fake_plugins("fake_sel_a", register_methods=_register_methods(_method("sel_a")))
    b = fake_plugins("fake_sel_b", register_methods=_register_methods(_method("sel_b")))
    return [
        _entry_point("builtin", "unipeft._builtin", "unipeft"),
        _entry_point("a", a, "unipeft-sel-a"),
        _entry_point("b", b, "unipeft_sel.b"),
    ]


def test_load_plugins_loads_only_the_named_distributions(fake_plugins, monkeypatch) -> None:
    eps = _two_plugins(fake_plugins)
    monkeypatch.setenv("UNIPEFT_LOAD_PLUGINS", "unipeft-sel-a")
    reg = build_registry(eps, strict=True)
    assert "sel_a" in reg.methods and "sel_b" not in reg.methods
    assert "lora" in reg.methods and "bert" in reg.tiny_backbones  # built-ins always load
    assert set(reg.plugins.values()) == {"unipeft", "unipeft-sel-a"}

    # names compare as packaging does: case and runs of - _ . are the same
    monkeypatch.setenv("UNIPEFT_LOAD_PLUGINS", " UNIPEFT-SEL-B , unipeft-sel_a")
    assert {"sel_a", "sel_b"} <= set(build_registry(eps, strict=True).methods)
    monkeypatch.setenv("UNIPEFT_LOAD_PLUGINS", "unipeft")  # only unipeft's own
    assert not {"sel_a", "sel_b"} & set(build_registry(eps, strict=True).methods)
    monkeypatch.setenv("UNIPEFT_LOAD_PLUGINS", "")  # unset or empty: all
    assert {"sel_a", "sel_b"} <= set(build_registry(eps, strict=True).methods)


def test_load_plugins_with_an_unknown_name(fake_plugins, monkeypatch) -> None:
    eps = _two_plugins(fake_plugins)
    monkeypatch.setenv("UNIPEFT_LOAD_PLUGINS", "unipeft-sel-a,unipeft-nope")
    reg = build_registry(eps, strict=False)
    [failure] = reg.failures
    assert failure.stage == "select" and failure.distribution == "unipeft-nope"
    assert "UNIPEFT_LOAD_PLUGINS names 'unipeft-nope'" in failure.error
    assert "unipeft-sel-a, unipeft_sel.b" in failure.error  # the installed ones
    assert "sel_a" in reg.methods
    with pytest.raises(PluginError, match="unipeft-nope"):
        build_registry(eps, strict=True)


def test_a_plugin_left_out_is_not_even_imported(monkeypatch) -> None:
    eps = [_entry_point("broken", "no_such_module_for_unipeft", "unipeft-broken")]
    monkeypatch.setenv("UNIPEFT_LOAD_PLUGINS", "unipeft")
    assert not build_registry(eps, strict=True).failures


# ------------------------------------------------------------------ tiny backbones


def _tiny(name: str):
    from torch import nn

    from unipeft.maps.tiny import TinyBackbone

    return TinyBackbone(
        name,
        "toy",
        lambda: nn.Linear(4, 4),
        lambda gen: {"x": __import__("torch").randn(2, 4, generator=gen)},
        lambda model, inputs: [model(inputs["x"])],
    )


def _register_tiny(*backbones):
    @unipeft.hookimpl
    def register_tiny_backbones(register):
        for bb in backbones:
            register(bb)

    return register_tiny_backbones


def test_builtin_tiny_backbones_come_from_the_registry() -> None:
    from unipeft.maps.tiny import BUILTIN_TINY_BACKBONES
    from unipeft.testing.backbones import BACKBONES

    reg = unipeft.registry()
    for bb in BUILTIN_TINY_BACKBONES:
        assert reg.tiny_backbones[bb.name] is bb is BACKBONES[bb.name]
        assert reg.tiny_sources[bb.name] == "unipeft (plugin 'builtin')"
    builtin = [b.name for b in BUILTIN_TINY_BACKBONES]
    assert [name for name in BACKBONES if name in builtin] == builtin  # registration order
    with pytest.raises(KeyError, match=r"unknown tiny backbone 'bertt'\. Did you mean 'bert'"):
        BACKBONES["bertt"]
    with pytest.raises(PluginError, match="Tiny backbones: bert, gpt2"):
        reg.tiny_backbone("nope")


def test_third_party_tiny_backbone(fake_plugins) -> None:
    mod = fake_plugins("fake_tiny", register_tiny_backbones=_register_tiny(_tiny("toy_linear")))
    reg = build_registry([_entry_point("tiny", mod, "unipeft-tiny")], strict=True)
    bb = reg.tiny_backbone("toy_linear")
    assert reg.tiny_sources["toy_linear"] == "unipeft-tiny (plugin 'tiny')"
    assert bb.run(bb.make(), bb.sample(0)).shape == (8,)
    assert "bert" in reg.tiny_backbones  # the built-ins are still there


def test_duplicate_tiny_backbone_names_name_both_sources(fake_plugins) -> None:
    mod = fake_plugins("fake_tiny_dup", register_tiny_backbones=_register_tiny(_tiny("gpt2")))
    with pytest.raises(PluginError) as info:
        build_registry([_entry_point("dup", mod, "unipeft-dup")], strict=False)
    message = str(info.value)
    assert "tiny backbone 'gpt2' is registered twice" in message
    assert "unipeft (plugin 'builtin')" in message and "unipeft-dup (plugin 'dup')" in message


def test_registering_something_else_as_a_tiny_backbone_fails(fake_plugins) -> None:
    mod = fake_plugins("fake_tiny_bad", register_tiny_backbones=_register_tiny("bert"))
    reg = build_registry([_entry_point("bad", mod, "unipeft-bad")], strict=False)
    [failure] = reg.failures
    assert failure.stage == "register_tiny_backbones" and "TinyBackbone" in failure.error
