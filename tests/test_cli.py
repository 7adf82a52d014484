"""The ``unipeft`` console command: list, plugins, inspect, and how it reports bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import unipeft
from unipeft import ConfigError, PluginError
from unipeft.cli import app
from unipeft.runtime import registry as plugins_module
from unipeft.testing.backbones import BACKBONES

ENV = {"COLUMNS": "200"}  # wide enough that table cells are not folded


def run(*args: str) -> Any:
    """Invoke the CLI in-process."""
    return CliRunner().invoke(app, list(args), env=ENV)


def run_json(*args: str) -> Any:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_error(result: Any, *fragments: str) -> str:
    """Exit code 2, one red line on stderr containing every fragment, no traceback."""
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error: "), message
    assert "\n" not in message, message
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


# ------------------------------------------------------------------------------ list


def test_list_shows_every_method_by_family() -> None:
    result = run("list")
    assert result.exit_code == 0, result.output
    for method in unipeft.list_methods():
        assert method.id in result.stdout
        assert f"{method.family} methods" in result.stdout
    assert "mergeable: yes" in result.stdout
    assert "budget field: r" in result.stdout


def test_list_json_is_every_registered_method() -> None:
    listed = run_json("list")
    assert isinstance(listed, list)
    by_id = {entry["id"]: entry for entry in listed}
    registered = {m.id: m for m in unipeft.list_methods()}
    assert set(by_id) == set(registered)
    for method_id, method in registered.items():
        entry = by_id[method_id]
        assert entry["family"] == method.family
        assert entry["formula"] == method.formula
        assert entry["budget_field"] == method.budget_field
        assert entry["distribution"] == method.distribution
    assert by_id["lora"]["mergeable"] is True
    assert by_id["lora"]["site_kinds"] == ["projection"]


def test_list_family_filter() -> None:
    listed = run_json("list", "--family", "reparameterized")
    assert {e["id"] for e in listed} == {
        m.id for m in unipeft.list_methods() if m.family == "reparameterized"
    }
    assert "lora" in {e["id"] for e in listed}


def test_list_unknown_family() -> None:
    assert_error(run("list", "--family", "nope"), "unknown family 'nope'", "reparameterized")


# --------------------------------------------------------------------------- plugins


needs_lora_fa = pytest.mark.skipif(
    "lora_fa" not in unipeft.registry().methods,
    reason="the example plugin unipeft-lora-fa is not installed",
)


def test_plugins_json_names_builtin() -> None:
    report = run_json("plugins")
    plugins = {p["name"]: p for p in report["plugins"]}
    builtin = plugins["builtin"]
    assert builtin["distribution"] == "unipeft"
    hooks = sorted(n for n in dir(unipeft.plugin_manager().hook) if not n.startswith("_"))
    assert builtin["hooks"] == hooks  # the built-ins implement every hook there is
    assert {"lora", "bitfit", "prompt_tuning"} <= set(builtin["methods"])
    assert {"transformers-bert", "open_clip", "generic"} <= set(builtin["structure_maps"])
    assert report["failures"] == []


@needs_lora_fa
def test_plugins_json_names_lora_fa() -> None:
    plugins = {p["name"]: p for p in run_json("plugins")["plugins"]}
    lora_fa = plugins["lora_fa"]
    assert lora_fa["distribution"] == "unipeft-lora-fa"
    assert lora_fa["methods"] == ["lora_fa"]
    assert lora_fa["hooks"] == ["register_methods"]
    assert lora_fa["structure_maps"] == []


def test_plugins_table() -> None:
    result = run("plugins")
    assert result.exit_code == 0, result.output
    for text in ("builtin", "register_methods", "transformers-bert"):
        assert text in result.stdout
    assert "No plugin failed." in result.stdout


@needs_lora_fa
def test_plugins_table_shows_lora_fa() -> None:
    result = run("plugins")
    assert result.exit_code == 0, result.output
    assert "unipeft-lora-fa" in result.stdout


class _BrokenPlugin:
    @unipeft.hookimpl
    def register_methods(self, register: Any) -> None:
        raise RuntimeError("boom")


@pytest.fixture
def broken_plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # CI runs with UNIPEFT_STRICT_PLUGINS=1; this test is about the non-strict report
    monkeypatch.delenv("UNIPEFT_STRICT_PLUGINS", raising=False)
    monkeypatch.setattr(plugins_module, "_IN_PROCESS", [])
    unipeft.register_plugin(_BrokenPlugin(), name="broken")
    yield
    monkeypatch.undo()
    unipeft.reset_registry()


@pytest.mark.filterwarnings("ignore:unipeft plugin 'broken'")
def test_plugins_reports_failures(broken_plugin: None) -> None:
    report = run_json("plugins")
    assert report["failures"] == [
        {
            "plugin": "broken",
            "distribution": "<in-process>",
            "stage": "register_methods",
            "error": "RuntimeError: boom",
        }
    ]
    table = run("plugins")
    assert "failed plugins" in table.stdout
    assert "RuntimeError: boom" in table.stdout


# --------------------------------------------------------------------------- inspect


def test_inspect_tiny_bert_roles() -> None:
    result = run("inspect", "tiny:bert")
    assert result.exit_code == 0, result.output
    assert "BertModel" in result.stdout
    assert "transformers-bert" in result.stdout
    assert "encoder.layer.0:attn.q … encoder.layer.1:attn.q" in result.stdout
    summary = run_json("inspect", "tiny:bert")
    roles = {(r["role"], r["tower"]): r for r in summary["roles"]}
    assert roles[("attn.q", None)]["count"] == 2
    assert roles[("attn.q", None)]["kinds"] == ["projection", "module"]
    assert roles[("tokens", None)]["kinds"] == ["sequence"]
    assert summary["parameters"] == sum(p.numel() for p in BACKBONES["bert"].make().parameters())
    assert summary["method"] is None


def test_inspect_budget_matches_plan_budget() -> None:
    plan = unipeft.plan_budget(BACKBONES["bert"].make(), "lora", "1%")
    report = run_json("inspect", "tiny:bert", "--method", "lora", "--budget", "1%")["method"]
    assert report["trainable"] == plan.trainable
    assert report["total"] == plan.total
    assert report["config"] == plan.config
    assert report["targets"] == plan.targets
    assert report["percent"] == pytest.approx(100 * plan.fraction)
    assert report["percent"] <= 1
    table = run("inspect", "tiny:bert", "--method", "lora", "--budget", "1%")
    assert table.exit_code == 0, table.output
    assert f"{plan.trainable:,}" in table.stdout
    assert f"{100 * plan.fraction:.4g}% of {plan.total:,}" in table.stdout


def test_inspect_budget_keeps_set_fields_fixed() -> None:
    plan = unipeft.plan_budget(BACKBONES["bert"].make(), "lora", "5%", targets=["attn.q"], alpha=4)
    report = run_json(
        "inspect", "tiny:bert", "-m", "lora", "-t", "attn.q", "--set", "alpha=4", "-b", "5%"
    )["method"]
    assert report["config"] == plan.config
    assert report["config"]["alpha"] == 4
    assert report["trainable"] == plan.trainable


def test_inspect_method_counts_the_built_adapter() -> None:
    backbone = BACKBONES["bert"].make()
    expected = unipeft.apply(backbone, "lora", targets=["attn.q", "mlp.up"], r=3)
    report = run_json("inspect", "tiny:bert", "-m", "lora", "-t", "attn.q mlp.up", "--set", "r=3")[
        "method"
    ]
    assert report["trainable"] == expected.num_trainable_parameters()
    assert report["sites"] == 4
    assert report["targets"] == ["attn.q", "mlp.up"]
    assert report["config"]["r"] == 3
    assert report["budget"] is None


def test_inspect_set_values_parse_as_json_else_string() -> None:
    report = run_json(
        "inspect",
        "tiny:bert",
        "-m",
        "bottleneck_adapter",
        "--set",
        "bottleneck=4",
        "--set",
        "placement=parallel",
        "--set",
        "scaling=0.5",
    )["method"]
    assert report["config"]["bottleneck"] == 4
    assert report["config"]["placement"] == "parallel"
    assert report["config"]["scaling"] == 0.5


def test_inspect_open_clip_towers() -> None:
    summary = run_json("inspect", "tiny:open_clip")
    towers = {r["tower"] for r in summary["roles"] if r["role"] == "attn.q"}
    assert towers == {"visual", "text"}


def test_inspect_minilm_is_the_real_model() -> None:
    summary = run_json("inspect", "minilm", "--method", "lora")
    assert summary["class"] == "BertModel"
    assert summary["parameters"] == 22_713_216  # all-MiniLM-L6-v2
    attn_q = next(r for r in summary["roles"] if r["role"] == "attn.q")
    assert attn_q["count"] == 6
    assert attn_q["names"] == [f"encoder.layer.{i}:attn.q" for i in range(6)]
    assert summary["method"]["sites"] == 12  # LoRA's defaults: attn.q and attn.v


def test_inspect_hf_config(tmp_path: Path) -> None:
    from transformers import BertConfig

    BertConfig(
        hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32
    ).to_json_file(tmp_path / "config.json")
    for spec in (f"hf:{tmp_path}", f"hf:{tmp_path / 'config.json'}"):
        summary = run_json("inspect", spec)
        assert summary["class"] == "BertModel"
        attn_q = next(r for r in summary["roles"] if r["role"] == "attn.q")
        assert attn_q["count"] == 3


def test_inspect_timm_model() -> None:
    summary = run_json("inspect", "timm:vit_tiny_patch16_224", "-m", "lora", "--set", "r=2")
    assert summary["class"] == "VisionTransformer"
    assert summary["structure_map"] == "timm-vit"
    assert summary["method"]["sites"] == 24  # 12 blocks, q and v slices of the fused qkv


# ---------------------------------------------------------------------------- errors


def test_unknown_method_suggests_close_ids() -> None:
    with pytest.raises(PluginError) as raised:
        unipeft.get_method("lorra")
    message = assert_error(run("inspect", "tiny:bert", "--method", "lorra"), "Did you mean")
    assert message == f"error: {raised.value}"
    assert "'lora'" in message


@pytest.mark.parametrize("spec", ["foo", "tiny:", "minilm:x", "gguf:model"])
def test_unknown_model_spec_lists_the_forms(spec: str) -> None:
    assert_error(
        run("inspect", spec),
        f"unknown model spec {spec!r}",
        "tiny:<name>",
        "timm:<model name>",
        "hf:<config.json",
        "open_clip:<model name>",
        "minilm",
    )


def test_unknown_tiny_backbone() -> None:
    assert_error(run("inspect", "tiny:bertt"), "'bertt'", ", ".join(BACKBONES))


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("timm:no_such_model", "timm has no model 'no_such_model'"),
        ("timm:hf-hub:timm/vit_tiny_patch16_224", "needs the network"),
        ("open_clip:no-such-model", "open_clip has no model config 'no-such-model'"),
        ("open_clip:hf-hub:laion/CLIP-ViT-B-32", "needs the network"),
        ("hf:/no/such/dir", "no config.json there"),
    ],
)
def test_model_spec_that_cannot_be_built_offline(spec: str, fragment: str) -> None:
    assert_error(run("inspect", spec), fragment)


def test_budget_no_configuration_meets() -> None:
    with pytest.raises(ConfigError) as raised:
        unipeft.plan_budget(BACKBONES["bert"].make(), "lora", "0.01%")
    message = assert_error(run("inspect", "tiny:bert", "-m", "lora", "--budget", "0.01%"))
    assert message == f"error: {raised.value}"
    assert "no configuration of 'lora' fits" in message


def test_budget_not_a_number() -> None:
    assert_error(run("inspect", "tiny:bert", "-m", "lora", "--budget", "lots"), "'lots'")


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [("rr=3", "unknown field 'rr'"), ("r=0", "field 'r'"), ("init=banana", "field 'init'")],
)
def test_invalid_set_field_shows_the_config_error(setting: str, fragment: str) -> None:
    key, _, value = setting.partition("=")
    with pytest.raises(ConfigError) as raised:
        unipeft.get_method("lora").config.parse("lora", {key: json_or_text(value)})
    message = assert_error(run("inspect", "tiny:bert", "-m", "lora", "--set", setting), fragment)
    assert message == f"error: {one_line(str(raised.value))}"


def json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def test_set_needs_key_value() -> None:
    assert_error(run("inspect", "tiny:bert", "-m", "lora", "--set", "r"), "key=value", "'r'")


def test_method_options_need_method() -> None:
    assert_error(run("inspect", "tiny:bert", "--budget", "1%"), "--method")


def test_target_error_is_reported() -> None:
    assert_error(run("inspect", "tiny:bert", "-m", "lora", "-t", "attn.x"), "'attn.x'")


# ----------------------------------------------------------------------- entry point


def test_console_script_lists_methods_as_json() -> None:
    script = Path(sys.executable).with_name("unipeft")
    assert script.exists(), f"{script} is missing: reinstall unipeft (pip install -e .)"
    done = subprocess.run(
        [str(script), "list", "--json"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    ids = {entry["id"] for entry in json.loads(done.stdout)}
    assert ids == {m.id for m in unipeft.list_methods()}
