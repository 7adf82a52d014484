"""``unipeft bench sweep`` on CPU-sized layers: one row per grid point, ratios that are the
quotients of the figures, the markdown table, the PNG, the command."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import unipeft.cli
from unipeft.bench import perf_sweep
from unipeft.bench.plots import sweep_chart

pytest.importorskip("peft")


def _quotient(ratio: float | None, a: float | None, b: float | None) -> bool:
    return ratio is None if a is None or b is None else ratio == pytest.approx(a / b)


def tiny_sweep() -> perf_sweep.SweepConfig:
    return replace(perf_sweep.quick_sweep(), lengths=(8, 16), ranks=(2,), steps=2)


@pytest.fixture(scope="module")
def sweep() -> dict[str, Any]:
    return perf_sweep.run_sweep(tiny_sweep())


def test_sweep_rows(sweep: dict[str, Any]) -> None:
    rows = sweep["rows"]
    assert not sweep["errors"]
    hiddens = [s["hidden_size"] for s in perf_sweep.QUICK_SHAPES]
    assert [(r["hidden"], r["length"], r["rank"]) for r in rows] == [
        (h, n, 2) for h in hiddens for n in (8, 16)
    ]
    for r in rows:
        assert r["tokens"] == r["batch"] * r["length"]
        assert r["floor_ms"] == pytest.approx(sum(r["floor_ms_before_after"]) / 2)
        for lib in ("unipeft", "peft", "peft_default"):
            assert r[f"{lib}_ms"] > 0
            assert _quotient(r[f"{lib}_to_floor"], r[f"{lib}_ms"], r["floor_ms"])
        assert _quotient(r["unipeft_to_peft"], r["unipeft_ms"], r["peft_ms"])
    cfg = sweep["config"]
    assert cfg["optimizer"]["fused"] is True and "autocast_adapter_dtype=False" in cfg["peft"]
    json.loads(json.dumps(sweep))


def test_sweep_table_and_plot(sweep: dict[str, Any], tmp_path: Path) -> None:
    table = perf_sweep.sweep_markdown(sweep).splitlines()
    assert table[0].startswith("| hidden | seq |") and "PEFT fp32 adapters ÷ floor" in table[0]
    assert len(table) == 2 + len(sweep["rows"])
    first = sweep["rows"][0]
    assert f"| {first['unipeft_to_floor']:.2f}× |" in table[2]
    png = tmp_path / "sweep.png"
    sweep_chart(sweep["rows"], png, "tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_gap_is_a_dash() -> None:
    row = {
        "hidden": 64, "length": 8, "tokens": 8, "floor_ms": 1.0, "rank": 2,
        "unipeft_ms": None, "peft_ms": 2.0, "unipeft_to_floor": None, "peft_to_floor": 2.0,
        "unipeft_to_peft": None,
    }  # fmt: skip
    line = perf_sweep.sweep_markdown({"rows": [row]}).splitlines()[2]
    assert line == "| 64 | 8 | 8 | 1.00 | 2 | — | 2.00 | — | 2.00× | — |"


def test_sweep_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = tiny_sweep()
    monkeypatch.setattr(perf_sweep, "quick_sweep", lambda device="cpu": small)
    args = ["bench", "sweep", "--quick", "--output", str(tmp_path), "--hidden", "64"]
    result = CliRunner().invoke(unipeft.cli.app, [*args, "--no-peft-default"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert {r["hidden"] for r in data["rows"]} == {64}
    assert not any("peft_default_ms" in r for r in data["rows"])
    assert (tmp_path / "sweep.md").read_text() == perf_sweep.sweep_markdown(data)
    assert (tmp_path / "sweep.png").stat().st_size > 0
    bad = CliRunner().invoke(unipeft.cli.app, [*args[:-1], "4096"])
    assert bad.exit_code == 2 and "hidden sizes 64, 96" in bad.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sweep_in_bf16() -> None:
    out = perf_sweep.run_sweep(replace(tiny_sweep(), device="cuda"))
    assert out["config"]["dtype"] == "bfloat16" and not out["errors"]
    assert all(r["unipeft_to_floor"] > 0 and r["peft_to_floor"] > 0 for r in out["rows"])
