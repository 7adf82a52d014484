# ruff: noqa: E501  (the table of cases below keeps one case per line)
"""Bad input, a table of careless calls: each must raise a clear error that names the problem
and the fix, and change nothing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _state import files as state_files
from _state import fingerprint
from torch import nn

import unipeft
from unipeft import (
    AdapterError,
    ConfigError,
    LoadError,
    MergeError,
    PluginError,
    TargetError,
    UnipeftError,
)
from unipeft.testing.backbones import BACKBONES

# ====================================================================== the bad-input suite
# Each case: a subject (a backbone or a model, built fresh), a careless call, the error it
# must raise and words its message must contain (the culprit, and what is accepted). Every
# case also checks that the subject's fingerprint (tensors bit for bit, flags, hooks,
# module types, adapters, active and merged sets) and the files under tmp_path are exactly
# as before the call.


class _Files:
    """Paths a case may use: ``saved`` (adapters written by save()), ``file`` (a plain
    file), ``fresh`` (a folder that does not exist yet)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.saved = root / "saved"
        self.file = root / "notes.txt"
        self.fresh = root / "fresh"


def _bert() -> nn.Module:
    return BACKBONES["bert"].make()


def _gpt2() -> nn.Module:
    return BACKBONES["gpt2"].make()


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))


def _lora() -> unipeft.DeltaModel:
    return unipeft.apply(_bert(), "lora", r=2)


def _two() -> unipeft.DeltaModel:
    """Two LoRA adapters, ``a`` active, ``b`` not."""
    model = unipeft.apply(_bert(), "lora", r=2, adapter_name="a")
    model.add_adapter("b", "lora", r=2)
    return model


def _merged() -> unipeft.DeltaModel:
    model = _lora()
    model.merge()
    return model


def _adapter_model() -> unipeft.DeltaModel:
    return unipeft.apply(_bert(), "bottleneck_adapter", bottleneck=4)


def _prompted_gpt2() -> unipeft.DeltaModel:
    return unipeft.apply(_gpt2(), "prompt_tuning", num_tokens=60)


def _prompted_bert() -> unipeft.DeltaModel:
    return unipeft.apply(_bert(), "prompt_tuning", num_tokens=2)


def _unloaded() -> unipeft.DeltaModel:
    model = _lora()
    model.unload()
    return model


IDS = torch.ones(2, 5, dtype=torch.long)


def _enter(cm) -> None:
    with cm:
        pass


def _run_mixed(model, names, ids=IDS) -> None:
    with model.mixed_batch(names):
        model(ids)


class _PluginHooks:
    """An in-process plugin whose method (or map) is broken in one place."""

    def __init__(self, method=None, smap=None) -> None:
        self.method, self.smap = method, smap

    @unipeft.hookimpl
    def register_methods(self, register) -> None:  # type: ignore[no-untyped-def]
        if self.method is not None:
            register(self.method)

    @unipeft.hookimpl
    def register_backbones(self, register) -> None:  # type: ignore[no-untyped-def]
        if self.smap is not None:
            register(self.smap)


def _raise(*args, **kwargs):
    raise RuntimeError("plugin bug")


def _plugin_method(**changes) -> unipeft.Method:
    lora = unipeft.get_method("lora")
    fields = dict(
        id="broken_method",
        family="reparameterized",
        config=lora.config,
        build=lora.build,
        num_parameters=lora.num_parameters,
        formula="r·(d_in+d_out)",
        site_kinds=("projection",),
        default_targets=("attn.q",),
        mergeable=True,
        identity_at_init=True,
        paper="test",
    )
    fields.update(changes)
    return unipeft.Method(**fields)


class _SitesRaise:
    name = "broken_sites"
    priority = 50

    def matches(self, model: nn.Module) -> bool:
        return True

    def sites(self, model: nn.Module) -> list:
        raise RuntimeError("plugin bug")


def _with_plugin(backbone, *, strict=False, **hooks):
    from unipeft.runtime.registry import build_registry

    plugin = ("brokenplugin", _PluginHooks(**hooks), "unipeft-fake-broken")
    reg = build_registry([], strict=strict, extra_plugins=[plugin])
    return unipeft.DeltaModel(backbone, _registry=reg)


def _case(case_id, subject, call, error, *words, saved=False):
    return pytest.param(subject, call, error, words, saved, id=case_id)


A = unipeft.apply
# fmt: off
CASES = [
    # ---------------------------------------------------------------- argument types
    _case("apply-backbone-str", _bert, lambda m, f: A("bert", "lora"), TypeError, "backbone", "nn.Module", "'bert'"),
    _case("apply-backbone-none", _bert, lambda m, f: A(None, "lora"), TypeError, "backbone", "nn.Module", "None"),
    _case("apply-backbone-dict", _bert, lambda m, f: A({}, "lora"), TypeError, "backbone", "nn.Module", "dict"),
    _case("apply-backbone-int", _bert, lambda m, f: A(5, "lora"), TypeError, "backbone", "nn.Module", "int"),
    _case("apply-backbone-list", _bert, lambda m, f: A([m], "lora"), TypeError, "backbone", "nn.Module", "list"),
    _case("apply-backbone-class", _bert, lambda m, f: A(type(m), "lora"), TypeError, "backbone", "nn.Module"),
    _case("apply-method-int", _bert, lambda m, f: A(m, 5), TypeError, "method", "'lora'", "int 5"),
    _case("apply-method-none", _bert, lambda m, f: A(m, None), TypeError, "method", "'lora'"),
    _case("apply-method-list", _bert, lambda m, f: A(m, ["lora"]), TypeError, "method", "list"),
    _case("apply-method-unknown", _bert, lambda m, f: A(m, "lorra"), PluginError, "'lorra'", "Did you mean 'lora'"),
    _case("apply-method-empty", _bert, lambda m, f: A(m, ""), PluginError, "unknown method ''", "Registered methods"),
    _case("apply-method-case", _bert, lambda m, f: A(m, "LoRA"), PluginError, "'LoRA'", "lora"),
    _case("apply-name-int", _bert, lambda m, f: A(m, "lora", adapter_name=5), AdapterError, "adapter name 5", "letters"),
    _case("apply-name-empty", _bert, lambda m, f: A(m, "lora", adapter_name=""), AdapterError, "adapter name ''", "1 to 128"),
    _case("apply-name-base", _bert, lambda m, f: A(m, "lora", adapter_name="__base__"), AdapterError, "'__base__'", "reserved"),
    _case("apply-name-space", _bert, lambda m, f: A(m, "lora", adapter_name="a b"), AdapterError, "'a b'", "letters"),
    _case("apply-name-long", _bert, lambda m, f: A(m, "lora", adapter_name="x" * 129), AdapterError, "1 to 128"),
    _case("apply-name-dot", _bert, lambda m, f: A(m, "lora", adapter_name="a.b"), AdapterError, "'a.b'"),
    _case("apply-twice-on-a-backbone", _lora, lambda m, f: A(m.base_model, "bitfit"), AdapterError, "already carries", "add_adapter"),
    _case("apply-to-a-deltamodel", _lora, lambda m, f: A(m, "bitfit"), AdapterError, "already a unipeft DeltaModel", "add_adapter"),
    _case("deltamodel-of-a-str", _bert, lambda m, f: unipeft.DeltaModel("bert"), TypeError, "backbone", "nn.Module"),
    _case("inspect-sites-int", _bert, lambda m, f: unipeft.inspect_sites(5), TypeError, "backbone", "nn.Module"),
    _case("plan-budget-backbone-int", _bert, lambda m, f: unipeft.plan_budget(5, "lora", "1%"), TypeError, "backbone", "nn.Module"),
    _case("plan-budget-method-int", _bert, lambda m, f: unipeft.plan_budget(m, 5, "1%"), TypeError, "method", "int 5"),
    _case("plan-budget-targets-int", _bert, lambda m, f: unipeft.plan_budget(m, "lora", "1%", targets=5), TargetError, "targets", "int 5"),
    _case("plan-budget-not-a-number", _bert, lambda m, f: unipeft.plan_budget(m, "lora", "lots"), ConfigError, "'lots'", "'0.5%'"),
    _case("plan-budget-above-all", _bert, lambda m, f: unipeft.plan_budget(m, "lora", "150%"), ConfigError, "'150%'", "at most 100%"),
    _case("get-method-int", _bert, lambda m, f: unipeft.get_method(5), TypeError, "method id", "'lora'"),
    _case("get-method-unknown", _bert, lambda m, f: unipeft.get_method("nope"), PluginError, "'nope'", "Registered methods"),
    # ---------------------------------------------------------------- targets
    _case("targets-int", _bert, lambda m, f: A(m, "lora", targets=5), TargetError, "targets", "list of target strings", "int 5"),
    _case("targets-float", _bert, lambda m, f: A(m, "lora", targets=4.5), TargetError, "targets", "list of target strings"),
    _case("targets-dict", _bert, lambda m, f: A(m, "lora", targets={"attn.q": 1}), TargetError, "targets", "dict"),
    _case("targets-set", _bert, lambda m, f: A(m, "lora", targets={"attn.q"}), TargetError, "targets", "set"),
    _case("targets-bytes", _bert, lambda m, f: A(m, "lora", targets=b"attn.q"), TargetError, "targets", "bytes"),
    _case("targets-item-int", _bert, lambda m, f: A(m, "lora", targets=[5]), TargetError, "targets[0]", "non-empty string"),
    _case("targets-item-none", _bert, lambda m, f: A(m, "lora", targets=["attn.q", None]), TargetError, "targets[1]", "non-empty string"),
    _case("targets-item-empty", _bert, lambda m, f: A(m, "lora", targets=[""]), TargetError, "targets[0]", "non-empty string"),
    _case("targets-item-question", _bert, lambda m, f: A(m, "lora", targets=["?"]), TargetError, "targets[0]", "'?'"),
    _case("targets-item-list", _bert, lambda m, f: A(m, "lora", targets=[["attn.q"]]), TargetError, "targets[0]", "list"),
    _case("targets-empty-list", _bert, lambda m, f: A(m, "lora", targets=[]), TargetError, "targets is empty", "None"),
    _case("targets-empty-str", _bert, lambda m, f: A(m, "lora", targets=""), TargetError, "non-empty string", "''"),
    _case("selector-four-parts", _bert, lambda m, f: A(m, "lora", targets=["attn.q[0:1:2:3]"]), TargetError, "'attn.q[0:1:2:3]'", "[0:4]"),
    _case("selector-letters", _bert, lambda m, f: A(m, "lora", targets=["attn.q[a:b]"]), TargetError, "'attn.q[a:b]'", "[0,2,-1]"),
    _case("selector-reversed", _bert, lambda m, f: A(m, "lora", targets=["attn.q[5:2]"]), TargetError, "'attn.q[5:2]'", "selects no layer", "2 layers (0..1)"),
    _case("selector-beyond", _bert, lambda m, f: A(m, "lora", targets=["attn.q[10:20]"]), TargetError, "'attn.q[10:20]'", "2 layers (0..1)"),
    _case("selector-negative-step", _bert, lambda m, f: A(m, "lora", targets=["attn.q[0:2:-1]"]), TargetError, "'attn.q[0:2:-1]'", "selects no layer"),
    _case("selector-zero-step", _bert, lambda m, f: A(m, "lora", targets=["attn.q[0:2:0]"]), TargetError, "'attn.q[0:2:0]'", "step not 0"),
    _case("selector-index-out", _bert, lambda m, f: A(m, "lora", targets=["attn.q[7]"]), TargetError, "'attn.q[7]'", "layer 7 is out of range", "(0..1)"),
    _case("selector-negative-out", _bert, lambda m, f: A(m, "lora", targets=["attn.q[-3]"]), TargetError, "'attn.q[-3]'", "layer -3 is out of range"),
    _case("selector-index-out-gpt2", _gpt2, lambda m, f: A(m, "lora", targets=["attn.v[2]"]), TargetError, "'attn.v[2]'", "2 layers"),
    _case("selector-empty", _bert, lambda m, f: A(m, "lora", targets=["attn.q[]"]), TargetError, "'attn.q[]'", "[0:4]"),
    _case("selector-double-comma", _bert, lambda m, f: A(m, "lora", targets=["attn.q[1,,0]"]), TargetError, "'attn.q[1,,0]'", "[0,2,-1]"),
    _case("selector-float", _bert, lambda m, f: A(m, "lora", targets=["attn.q[0.5]"]), TargetError, "'attn.q[0.5]'", "[0:4]"),
    _case("selector-unclosed", _bert, lambda m, f: A(m, "lora", targets=["attn.q[0:1"]), TargetError, "'attn.q[0:1'", "not a valid regex"),
    _case("regex-invalid", _bert, lambda m, f: A(m, "lora", targets=["re:("]), TargetError, "'re:('", "regex"),
    _case("regex-no-module", _bert, lambda m, f: A(m, "lora", targets=["re:no\\.such"]), TargetError, "'re:no\\\\.such'", "matches no module"),
    _case("tower-unknown", _bert, lambda m, f: A(m, "lora", targets=["foo/attn.q"]), TargetError, "'foo/attn.q'", "Roles on this backbone"),
    _case("role-missing", _bert, lambda m, f: A(m, "lora", targets=["mlp.gate"]), TargetError, "'mlp.gate'", "attn.q (x2)"),
    _case("role-on-generic", _mlp, lambda m, f: A(m, "lora", targets=["attn.q"]), TargetError, "attn.q", "semantic roles", "re:"),
    _case("site-kind-norm", _bert, lambda m, f: A(m, "lora", targets=["norm"]), TargetError, "'lora'", "projection sites"),
    _case("site-kind-tokens", _bert, lambda m, f: A(m, "lora", targets=["tokens"]), TargetError, "'lora'", "sequence site"),
    _case("site-kind-prompt-on-proj", _bert, lambda m, f: A(m, "prompt_tuning", targets=["attn.q"]), TargetError, "'prompt_tuning'", "sequence"),
    _case("site-bitfit-sublayer", _bert, lambda m, f: A(m, "bitfit", targets=["mlp"]), TargetError, "'bitfit'", "sublayer path"),
    _case("site-only-optional-refused", _bert, lambda m, f: A(m, "lora", targets=["norm?"]), TargetError, "'lora'", "match nothing method 'lora' can attach to"),
    # ---------------------------------------------------------------- config values
    _case("config-r-zero", _bert, lambda m, f: A(m, "lora", r=0), ConfigError, "'r'", ">= 1"),
    _case("config-r-negative", _bert, lambda m, f: A(m, "lora", r=-1), ConfigError, "'r'", ">= 1"),
    _case("config-r-bool", _bert, lambda m, f: A(m, "lora", r=True), ConfigError, "'r'", "True"),
    _case("config-r-str", _bert, lambda m, f: A(m, "lora", r="4"), ConfigError, "'r'", "'4'"),
    _case("config-r-float", _bert, lambda m, f: A(m, "lora", r=4.0), ConfigError, "'r'", "integer"),
    _case("config-r-none", _bert, lambda m, f: A(m, "lora", r=None), ConfigError, "'r'", "None"),
    _case("config-r-too-big", _bert, lambda m, f: A(m, "lora", r=5000), ConfigError, "'r'", "<= 4096"),
    _case("config-alpha-inf", _bert, lambda m, f: A(m, "lora", alpha=math.inf), ConfigError, "'alpha'", "finite"),
    _case("config-alpha-nan", _bert, lambda m, f: A(m, "lora", alpha=math.nan), ConfigError, "'alpha'", "finite"),
    _case("config-alpha-str", _bert, lambda m, f: A(m, "lora", alpha="16"), ConfigError, "'alpha'", "'16'"),
    _case("config-alpha-negative", _bert, lambda m, f: A(m, "lora", alpha=-1.0), ConfigError, "'alpha'", "> 0"),
    _case("config-alpha-bool", _bert, lambda m, f: A(m, "lora", alpha=True), ConfigError, "'alpha'", "True"),
    _case("config-dropout-one", _bert, lambda m, f: A(m, "lora", dropout=1.0), ConfigError, "'dropout'", "< 1"),
    _case("config-dropout-negative", _bert, lambda m, f: A(m, "lora", dropout=-0.1), ConfigError, "'dropout'", ">= 0"),
    _case("config-dropout-nan", _bert, lambda m, f: A(m, "lora", dropout=math.nan), ConfigError, "'dropout'", "finite"),
    _case("config-unknown-field", _bert, lambda m, f: A(m, "lora", rank=4), ConfigError, "'rank'", "fields of LoraConfig are"),
    _case("config-peft-field", _bert, lambda m, f: A(m, "lora", target_modules=["query"]), ConfigError, "'target_modules'", "alpha"),
    _case("config-dora-r-zero", _bert, lambda m, f: A(m, "dora", r=0), ConfigError, "'r'", ">= 1"),
    _case("config-moe-one-expert", _bert, lambda m, f: A(m, "moe_lora", num_experts=1), ConfigError, "'num_experts'", ">= 2"),
    _case("config-moe-top-k-over", _bert, lambda m, f: A(m, "moe_lora", num_experts=2, top_k=3), ConfigError, "top_k", "num_experts"),
    _case("config-moe-top-k-zero", _bert, lambda m, f: A(m, "moe_lora", top_k=0), ConfigError, "'top_k'", ">= 1"),
    _case("config-adapter-bottleneck-zero", _bert, lambda m, f: A(m, "bottleneck_adapter", bottleneck=0), ConfigError, "'bottleneck'", ">= 1"),
    _case("config-adapter-placement", _bert, lambda m, f: A(m, "bottleneck_adapter", placement="sideways"), ConfigError, "'placement'", "houlsby"),
    _case("config-adapter-activation", _bert, lambda m, f: A(m, "bottleneck_adapter", activation="swish"), ConfigError, "'activation'", "gelu"),
    _case("config-prompt-zero", _bert, lambda m, f: A(m, "prompt_tuning", num_tokens=0), ConfigError, "'num_tokens'", ">= 1"),
    _case("config-prompt-init", _bert, lambda m, f: A(m, "prompt_tuning", init="zeros"), ConfigError, "'init'", "vocab"),
    _case("config-prompt-std-zero", _bert, lambda m, f: A(m, "prompt_tuning", init_std=0.0), ConfigError, "'init_std'", "> 0"),
    _case("config-unipelt-prompt-negative", _bert, lambda m, f: A(m, "unipelt", prompt_tokens=-1), ConfigError, "'prompt_tokens'", ">= 0"),
    _case("config-unipelt-r-bool", _bert, lambda m, f: A(m, "unipelt", lora_r=True), ConfigError, "'lora_r'", "True"),
    _case("config-bitfit-unknown", _bert, lambda m, f: A(m, "bitfit", r=4), ConfigError, "'r'", "unknown field"),
    _case("config-add-adapter-str", _lora, lambda m, f: m.add_adapter("b", "lora", r="2"), ConfigError, "'r'", "'2'"),
    # ---------------------------------------------------------------- sizes against sites
    _case("size-prompt-gpt2-full", _gpt2, lambda m, f: A(m, "prompt_tuning", num_tokens=64), ConfigError, "num_tokens=64", "64 positions", "<= 63"),
    _case("size-prompt-gpt2-huge", _gpt2, lambda m, f: A(m, "prompt_tuning", num_tokens=1024), ConfigError, "num_tokens=1024", "<= 63"),
    _case("size-prompt-bert", _bert, lambda m, f: A(m, "prompt_tuning", num_tokens=512), ConfigError, "num_tokens=512", "<= 511"),
    _case("size-unipelt-gpt2", _gpt2, lambda m, f: A(m, "unipelt", prompt_tokens=100), ConfigError, "prompt_tokens=100", "<= 63"),
    _case("size-prompt-second-adapter", _prompted_gpt2, lambda m, f: m.add_adapter("b", "prompt_tuning", num_tokens=64), ConfigError, "num_tokens=64", "'tokens'"),
    _case("size-prompt-plan", _prompted_gpt2, lambda m, f: m.plan("prompt_tuning", num_tokens=70), ConfigError, "num_tokens=70", "<= 63"),
    _case("size-lora-r-512", _bert, lambda m, f: A(m, "lora", r=512), ConfigError, "r=512", "32->32", "r <= 32"),
    _case("size-lora-r-33", _bert, lambda m, f: A(m, "lora", r=33, targets=["mlp.up"]), ConfigError, "r=33", "32->64", "r <= 32"),
    _case("size-dora-r", _bert, lambda m, f: A(m, "dora", r=64), ConfigError, "'dora'", "r=64", "r <= 32"),
    _case("size-moe-lora-r", _bert, lambda m, f: A(m, "moe_lora", r=40), ConfigError, "'moe_lora'", "r=40", "r <= 32"),
    _case("size-unipelt-lora-r", _bert, lambda m, f: A(m, "unipelt", lora_r=100), ConfigError, "lora_r=100", "lora_r <= 32"),
    _case("size-lora-r-second-adapter", _lora, lambda m, f: m.add_adapter("b", "lora", r=48), ConfigError, "r=48", "r <= 32"),
    _case("size-plan-budget-fixed-r", _bert, lambda m, f: unipeft.plan_budget(m, "lora", "50%", r=64), ConfigError, "r=64", "r <= 32"),
    _case("size-prompt-input-too-long", _prompted_gpt2, lambda m, f: m(torch.ones(1, 10, dtype=torch.long)), ValueError, "60 soft tokens", "64", "at most 4 input tokens"),
    # ---------------------------------------------------------------- names and lifecycle
    _case("set-active-int", _lora, lambda m, f: m.set_active(5), TypeError, "set_active(names)", "adapter name"),
    _case("set-active-none", _lora, lambda m, f: m.set_active(None), TypeError, "set_active(names)", "None"),
    _case("set-active-dict", _lora, lambda m, f: m.set_active({"default": 1}), TypeError, "set_active(names)", "dict"),
    _case("set-active-item-int", _lora, lambda m, f: m.set_active(["default", 5]), TypeError, "set_active(names)[1]", "int 5"),
    _case("set-active-twice", _lora, lambda m, f: m.set_active(["default", "default"]), AdapterError, "'default'", "more than once"),
    _case("set-active-unknown", _lora, lambda m, f: m.set_active("nope"), AdapterError, "'nope'", "adapters on this model: default"),
    _case("set-active-unknown-in-list", _two, lambda m, f: m.set_active(["b", "nope"]), AdapterError, "'nope'", "a, b"),
    _case("get-adapter-int", _lora, lambda m, f: m.get_adapter(5), TypeError, "get_adapter(name)", "string"),
    _case("get-adapter-unknown", _lora, lambda m, f: m.get_adapter("nope"), AdapterError, "'nope'", "default"),
    _case("delete-none", _lora, lambda m, f: m.delete_adapter(None), TypeError, "delete_adapter(name)", "None"),
    _case("delete-int", _lora, lambda m, f: m.delete_adapter(5), TypeError, "delete_adapter(name)", "int 5"),
    _case("delete-unknown", _two, lambda m, f: m.delete_adapter("nope"), AdapterError, "'nope'", "a, b"),
    _case("delete-active", _two, lambda m, f: m.delete_adapter("a"), AdapterError, "'a' is active", "set_active"),
    _case("delete-merged", _merged, lambda m, f: m.delete_adapter("default"), AdapterError, "'default' is active"),
    _case("add-method-int", _lora, lambda m, f: m.add_adapter("b", 5), TypeError, "method", "'lora'"),
    _case("add-method-none", _lora, lambda m, f: m.add_adapter("b", None), TypeError, "method", "None"),
    _case("add-name-int", _lora, lambda m, f: m.add_adapter(5, "lora"), AdapterError, "adapter name 5"),
    _case("add-name-taken", _lora, lambda m, f: m.add_adapter("default", "bitfit"), AdapterError, "'default'", "already in use"),
    _case("add-targets-int", _lora, lambda m, f: m.add_adapter("b", "lora", targets=5), TargetError, "targets", "int 5"),
    _case("attach-int", _lora, lambda m, f: m.attach("b", 5), TypeError, "plan", "AdapterPlan"),
    _case("attach-none", _lora, lambda m, f: m.attach("b", None), TypeError, "plan", "AdapterPlan"),
    _case("attach-name-taken", _lora, lambda m, f: m.attach("default", m.plan("lora")), AdapterError, "'default'", "already in use"),
    _case("plan-method-int", _lora, lambda m, f: m.plan(5), TypeError, "method", "'lora'"),
    _case("attach-plan-of-another-model", _lora, lambda m, f: m.attach("b", _lora().plan("lora")), TargetError, "belongs to another model", "inspect_sites"),
    _case("plan-record-method-str", _lora, lambda m, f: unipeft.AdapterPlan("lora", None, ()), TypeError, "method", "get_method"),
    _case("plan-record-site-str", _lora, lambda m, f: unipeft.AdapterPlan(m.adapters["default"].method, m.adapters["default"].config, ("x",)), TypeError, "sites[0]", "inspect_sites"),
    _case("delta-at-int", _lora, lambda m, f: m.adapters["default"].delta_at(5), TypeError, "site", "int"),
    _case("delta-at-unknown", _lora, lambda m, f: m.adapters["default"].delta_at("nope"), AdapterError, "'nope'", "'default'"),
    _case("merge-int", _lora, lambda m, f: m.merge(5), TypeError, "merge(adapter_names)", "int 5"),
    _case("merge-item-int", _lora, lambda m, f: m.merge([5]), TypeError, "merge(adapter_names)[0]", "string"),
    _case("merge-unknown", _lora, lambda m, f: m.merge("nope"), AdapterError, "'nope'", "default"),
    _case("merge-twice-in-a-list", _two, lambda m, f: m.merge(["a", "a"]), AdapterError, "'a'", "more than once"),
    _case("merge-inactive", _two, lambda m, f: m.merge("b"), MergeError, "'b'", "not active", "set_active"),
    _case("merge-partly-inactive", _two, lambda m, f: m.merge(["a", "b"]), MergeError, "'b'", "not active"),
    _case("merge-unmergeable", _adapter_model, lambda m, f: m.merge(), MergeError, "'bottleneck_adapter'", "cannot be merged"),
    _case("unmerge-int", _merged, lambda m, f: m.unmerge(5), TypeError, "unmerge(adapter_names)", "int 5"),
    _case("unmerge-unknown", _merged, lambda m, f: m.unmerge("nope"), AdapterError, "'nope'", "default"),
    _case("merged-set-active-empty", _merged, lambda m, f: m.set_active([]), MergeError, "['default']", "unmerge"),
    _case("merged-mixed-batch", _merged, lambda m, f: m(IDS, adapter_names=["default", "default"]), MergeError, "unmerge", "mixed batch"),
    # ---------------------------------------------------------------- mixed batches
    _case("mixed-forward-int", _two, lambda m, f: m(IDS, adapter_names=5), AdapterError, "adapter_names", "one name per sample"),
    _case("mixed-forward-str", _two, lambda m, f: m(IDS, adapter_names="a"), AdapterError, "adapter_names", "str 'a'"),
    _case("mixed-forward-empty", _two, lambda m, f: m(IDS, adapter_names=[]), AdapterError, "adapter_names is empty"),
    _case("mixed-forward-item-int", _two, lambda m, f: m(IDS, adapter_names=["a", 5]), AdapterError, "adapter_names[1]", "__base__"),
    _case("mixed-forward-unknown", _two, lambda m, f: m(IDS, adapter_names=["a", "zzz"]), AdapterError, "'zzz'", "a, b"),
    _case("mixed-forward-dict", _two, lambda m, f: m(IDS, adapter_names={"a": 0, "b": 1}), AdapterError, "adapter_names", "dict"),
    _case("mixed-forward-length", _two, lambda m, f: m(IDS, adapter_names=["a"]), AdapterError, "1 entries", "batch of 2"),
    _case("mixed-context-int", _two, lambda m, f: _enter(m.mixed_batch(5)), AdapterError, "adapter_names", "int 5"),
    _case("mixed-context-none", _two, lambda m, f: _enter(m.mixed_batch(None)), AdapterError, "adapter_names", "None"),
    _case("mixed-context-unknown", _two, lambda m, f: _enter(m.mixed_batch(["unknown"])), AdapterError, "'unknown'", "a, b"),
    _case("mixed-context-nested", _two, lambda m, f: _enter(m.mixed_batch([["a"]])), AdapterError, "adapter_names[0]", "list"),
    _case("mixed-context-length", _two, lambda m, f: _run_mixed(m, ["a"]), ValueError, "1 entries", "2 samples"),
    _case("mixed-context-length-adapter", _adapter_model, lambda m, f: _run_mixed(m, ["default"] * 3), ValueError, "3 entries", "2 samples"),
    _case("mixed-context-length-prompt", _prompted_bert, lambda m, f: _run_mixed(m, ["default"]), ValueError, "1 entries", "2 samples"),
    # ---------------------------------------------------------------- files
    _case("save-int", _lora, lambda m, f: m.save(5), TypeError, "directory", "int 5"),
    _case("save-none", _lora, lambda m, f: m.save(None), TypeError, "directory", "None"),
    _case("save-empty-path", _lora, lambda m, f: m.save(""), ValueError, "directory", "empty"),
    _case("save-to-a-file", _lora, lambda m, f: m.save(f.file), ValueError, "notes.txt", "is a file"),
    _case("save-inside-a-file", _lora, lambda m, f: m.save(f.file / "sub"), ValueError, "notes.txt", "a file"),
    _case("save-adapters-int", _lora, lambda m, f: m.save(f.fresh, adapters=5), TypeError, "save(adapters)", "int 5"),
    _case("save-adapters-unknown", _lora, lambda m, f: m.save(f.fresh, adapters=["nope"]), AdapterError, "'nope'", "default"),
    _case("save-adapters-twice", _lora, lambda m, f: m.save(f.fresh, adapters=["default"] * 2), AdapterError, "'default'", "more than once"),
    _case("save-adapters-empty", _lora, lambda m, f: m.save(f.fresh, adapters=[]), AdapterError, "no adapter to save"),
    _case("save-over-saved-unknown", _lora, lambda m, f: m.save(f.saved, adapters="nope"), AdapterError, "'nope'", saved=True),
    _case("load-directory-int", _bert, lambda m, f: unipeft.load(m, 5), TypeError, "directory", "int 5"),
    _case("load-directory-none", _bert, lambda m, f: unipeft.load(m, None), TypeError, "directory", "DeltaModel.save()"),
    _case("load-backbone-str", _bert, lambda m, f: unipeft.load("bert", f.saved), TypeError, "backbone", "nn.Module", saved=True),
    _case("load-backbone-none", _bert, lambda m, f: unipeft.load(None, f.saved), TypeError, "backbone", "None", saved=True),
    _case("load-a-file", _bert, lambda m, f: unipeft.load(m, f.file), LoadError, "notes.txt", "is a file"),
    _case("load-missing", _bert, lambda m, f: unipeft.load(m, f.fresh), LoadError, "does not exist"),
    _case("load-into-a-deltamodel", _lora, lambda m, f: unipeft.load(m, f.saved), AdapterError, "already a unipeft DeltaModel", "unload", saved=True),
    _case("load-wrong-architecture", _gpt2, lambda m, f: unipeft.load(m, f.saved), LoadError, "different architecture", saved=True),
    _case("load-onto-a-wrapped-backbone", _lora, lambda m, f: unipeft.load(m.base_model, f.saved), AdapterError, "already carries", saved=True),
    # ---------------------------------------------------------------- after unload
    _case("unloaded-merge", _unloaded, lambda m, f: m.merge(), AdapterError, "unloaded", "apply"),
    _case("unloaded-unmerge", _unloaded, lambda m, f: m.unmerge(), AdapterError, "unloaded"),
    _case("unloaded-set-active", _unloaded, lambda m, f: m.set_active("default"), AdapterError, "unloaded"),
    _case("unloaded-set-active-empty", _unloaded, lambda m, f: m.set_active([]), AdapterError, "unloaded"),
    _case("unloaded-add-adapter", _unloaded, lambda m, f: m.add_adapter("b", "lora"), AdapterError, "unloaded"),
    _case("unloaded-delete", _unloaded, lambda m, f: m.delete_adapter("default"), AdapterError, "unloaded"),
    _case("unloaded-forward", _unloaded, lambda m, f: m(IDS), AdapterError, "unloaded"),
    _case("unloaded-save", _unloaded, lambda m, f: m.save(f.fresh), AdapterError, "unloaded"),
    _case("unloaded-unload", _unloaded, lambda m, f: m.unload(), AdapterError, "unloaded"),
    _case("unloaded-list", _unloaded, lambda m, f: m.list_adapters(), AdapterError, "unloaded"),
    _case("unloaded-mixed", _unloaded, lambda m, f: _enter(m.mixed_batch(["default"])), AdapterError, "unloaded"),
    _case("unloaded-disable", _unloaded, lambda m, f: _enter(m.disable()), AdapterError, "unloaded"),
    _case("unloaded-plan", _unloaded, lambda m, f: m.plan("lora"), AdapterError, "unloaded"),
    _case("unloaded-backbone-attribute", _unloaded, lambda m, f: m.config, AdapterError, "unloaded"),
    _case("unloaded-get-adapter", _unloaded, lambda m, f: m.get_adapter("default"), AdapterError, "unloaded"),
    # ---------------------------------------------------------------- plugins
    _case("register-plugin-int", _bert, lambda m, f: unipeft.register_plugin(5), TypeError, "plugin", "@unipeft.hookimpl"),
    _case("register-plugin-none", _bert, lambda m, f: unipeft.register_plugin(None), TypeError, "plugin", "None"),
    _case("register-plugin-no-hooks", _bert, lambda m, f: unipeft.register_plugin(math), TypeError, "plugin", "module"),
    _case("plugin-build-raises", _bert, lambda m, f: _with_plugin(m, method=_plugin_method(build=_raise)).add_adapter("a", "broken_method"), PluginError, "'broken_method'", "unipeft-fake-broken", "build()"),
    _case("plugin-build-not-a-delta", _bert, lambda m, f: _with_plugin(m, method=_plugin_method(build=lambda c, s: nn.Linear(2, 2))).add_adapter("a", "broken_method"), PluginError, "'broken_method'", "unipeft-fake-broken", "DeltaModule"),
    _case("plugin-accepts-raises", _bert, lambda m, f: _with_plugin(m, method=_plugin_method(accepts=_raise)).add_adapter("a", "broken_method"), PluginError, "'broken_method'", "accepts()"),
    _case("plugin-size-check-raises", _bert, lambda m, f: _with_plugin(m, method=_plugin_method(size_check=_raise)).add_adapter("a", "broken_method"), PluginError, "'broken_method'", "size_check()"),
    _case("plugin-map-sites-strict", _bert, lambda m, f: _with_plugin(m, strict=True, smap=_SitesRaise()).add_adapter("a", "lora"), PluginError, "'broken_sites'", "unipeft-fake-broken", "sites()"),
]
# fmt: on


def test_the_suite_is_large_enough() -> None:
    assert len(CASES) >= 110
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("subject", "call", "error", "words", "saved"), CASES)
def test_bad_input(subject, call, error, words, saved, tmp_path: Path) -> None:
    files = _Files(tmp_path)
    files.file.write_text("not a folder")
    if saved:
        _lora().save(files.saved)
    model = subject()
    before, on_disk = fingerprint(model), state_files(tmp_path)
    with pytest.raises(error) as info:
        call(model, files)
    assert isinstance(info.value, UnipeftError | TypeError | ValueError)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert fingerprint(model) == before
    assert state_files(tmp_path) == on_disk


@pytest.mark.parametrize(
    ("subject", "call", "warning"),
    [
        pytest.param(_merged, lambda m: m.merge("default"), "already merged", id="merge-twice"),
        pytest.param(_merged, lambda m: m.merge(), "already merged", id="merge-twice-default"),
        pytest.param(_lora, lambda m: m.unmerge("default"), "not merged", id="unmerge-unmerged"),
    ],
)
def test_repeated_merges_warn_and_change_nothing(subject, call, warning) -> None:
    model = subject()
    before = fingerprint(model)
    with pytest.warns(UserWarning, match=warning):
        call(model)
    assert fingerprint(model) == before
