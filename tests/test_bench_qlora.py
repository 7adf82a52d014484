"""`unipeft bench qlora --quick`: the CPU-sized QLoRA comparison through the CLI, its figures
checked (both libraries wrap the very same quantized model: equal first losses, equal LoRA
sizes, float32 adapters), and the option checks."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import unipeft.cli
from unipeft.bench.qlora import TINY, make_config
from unipeft.contract.errors import ConfigError

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


def _lora_parameters(shape: dict[str, int], r: int) -> int:
    """r * (in + out) summed over q, k, v, o, gate, up, down of every layer."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h)
    return r * per_layer * shape["num_hidden_layers"]


def test_quick_run_through_the_cli(tmp_path) -> None:
    out = tmp_path / "qlora.json"
    result = CliRunner().invoke(unipeft.cli.app, ["bench", "qlora", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "unipeft / peft" in result.output
    figures = json.loads(out.read_text())
    cfg, rows = figures["config"], figures["rows"]
    assert cfg["quant_type"] == "nf4" and cfg["double_quant"] and cfg["device"] == "cpu"
    assert rows.keys() == {"unipeft", "peft"}
    want = _lora_parameters(TINY, cfg["rank"])
    for row in rows.values():
        assert row["trainable"] == want
        assert row["trainable_dtypes"] == ["float32"]
        assert len(row["step_times_s"]) == cfg["steps"] and row["step_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(cfg["batch"] * cfg["length"] / row["step_s"])
    # LoRA's B starts at zero: the first loss is the quantized base's, the same for both
    assert rows["unipeft"]["first_loss"] == pytest.approx(rows["peft"]["first_loss"], abs=1e-5)
    assert figures["ratios"]["step_s"] == pytest.approx(
        rows["unipeft"]["step_s"] / rows["peft"]["step_s"]
    )


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="model 'huge'"):
        make_config(model="huge")
    with pytest.raises(ConfigError, match="libraries"):
        make_config(quick=True, libraries="unipeft,other")
    cfg = make_config(quick=True, layers=1, libraries="peft")
    assert cfg.llama["num_hidden_layers"] == 1 and cfg.libraries == ("peft",)
    assert make_config(model="8b", device="cuda").llama["hidden_size"] == 4096
    bad = CliRunner().invoke(unipeft.cli.app, ["bench", "qlora", "--quick", "--device", "tpu"])
    assert bad.exit_code != 0 and "--device" in bad.output
