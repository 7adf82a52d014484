"""``unipeft bench robustness-summary``: several seeds' robustness runs as mean ± sd."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import unipeft.cli
from unipeft.bench.robustness_summary import summarise, summary_markdown
from unipeft.contract.errors import ConfigError


def _row(task: str, method: str, clean: float, mca: float, vs_full: float | None) -> dict:
    return {
        "task": task,
        "method": method,
        "family": "reparameterized",
        "trainable_fraction": 0.01,
        "clean": clean,
        "mca": mca,
        "relative": mca / clean,
        "vs_full": vs_full,
        "corrupted": {},
    }


def _result(seed: int, rows: list[dict], quick: bool = False) -> dict:
    return {"seed": seed, "quick": quick, "seconds": 10.0, "rows": rows}


def test_mean_and_sample_sd_over_seeds_per_recipe() -> None:
    runs = [
        _result(0, [_row("text", "lora", 0.90, 0.70, 1.0), _row("text", "bitfit", 0.8, 0.6, 0.9)]),
        _result(1, [_row("text", "lora", 0.92, 0.74, None)]),
        _result(2, [_row("text", "lora", 0.94, 0.72, 1.1)]),
    ]
    summary = summarise(runs)
    assert summary["seeds"] == [0, 1, 2] and summary["seconds"] == 30.0
    lora, bitfit = summary["rows"]  # in the order first seen
    assert lora["seeds"] == [0, 1, 2] and bitfit["seeds"] == [0]
    assert lora["clean"]["mean"] == pytest.approx(0.92)
    assert lora["clean"]["sd"] == pytest.approx(0.02)  # sample sd of 0.90, 0.92, 0.94
    assert lora["mca"]["values"] == [0.70, 0.74, 0.72]
    assert lora["vs_full"]["values"] == [1.0, 1.1]  # a missing ratio is left out
    assert bitfit["mca"] == {"mean": 0.6, "sd": 0.0, "values": [0.6]}
    text = summary_markdown(summary)
    assert "| lora | 3 | 0.920 ± 0.020 | 0.720 ± 0.020 |" in text
    assert "| bitfit | 1 | 0.800 | 0.600 |" in text


def test_a_seed_may_come_as_runs_over_different_towers() -> None:
    summary = summarise(
        [
            _result(0, [_row("vision / ViT", "lora", 0.9, 0.6, 1.0)]),
            _result(0, [_row("vision / ResNet", "lora", 0.95, 0.65, 1.0)]),
            _result(1, [_row("vision / ViT", "lora", 0.91, 0.62, 1.0)]),
        ]
    )
    assert [(r["task"], r["seeds"]) for r in summary["rows"]] == [
        ("vision / ViT", [0, 1]),
        ("vision / ResNet", [0]),
    ]


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        ([], "no robustness results"),
        ([_result(0, []), _result(1, [], quick=True)], "mix quick and full runs"),
        (
            [_result(0, [_row("t", "lora", 1, 1, 1)]), _result(0, [_row("t", "lora", 1, 1, 1)])],
            "appears twice for seed 0",
        ),
    ],
)
def test_inconsistent_runs_are_refused(runs: list[dict], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        summarise(runs)


def test_cli_writes_the_summary_and_refuses_what_is_not_a_run(tmp_path: Path) -> None:
    for seed in (0, 1):
        run = tmp_path / f"seed-{seed}"
        run.mkdir()
        rows = [_row("text", "lora", 0.9 + seed / 100, 0.7, 1.0)]
        (run / "robustness.json").write_text(json.dumps(_result(seed, rows)))
    out = tmp_path / "summary"
    args = ["bench", "robustness-summary", str(tmp_path / "seed-0"), str(tmp_path / "seed-1")]
    result = CliRunner().invoke(unipeft.cli.app, [*args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "robustness-seeds.json").read_text())
    assert data["seeds"] == [0, 1] and data["rows"][0]["clean"]["mean"] == pytest.approx(0.905)
    assert "0.905 ± 0.007" in (out / "robustness-seeds.md").read_text()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "robustness.json").write_text("{not json")
    refused = ((tmp_path / "nothing", "no robustness.json"), (bad, "not a robustness"))
    for target, message in refused:
        fresh = tmp_path / "never"
        result = CliRunner().invoke(
            unipeft.cli.app, ["bench", "robustness-summary", str(target), "--output", str(fresh)]
        )
        assert result.exit_code == 2 and message in result.output, result.output
        assert not fresh.exists()
