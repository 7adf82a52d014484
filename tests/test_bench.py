"""The survey experiments on a tiny model: JSON and PNG written, numbers sane."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import unipeft.cli
from unipeft.bench import check_writable, write_json
from unipeft.bench.survey import MEMORY_VARIANTS, VARIANTS, latency, memory
from unipeft.contract.errors import UnipeftError
from unipeft.testing.backbones import BACKBONES


def test_latency_rows_cover_every_variant() -> None:
    rows = latency(BACKBONES["bert"].make, batch=4, length=8, repeats=2)
    assert [r["variant"] for r in rows] == list(VARIANTS)
    assert rows[0]["ratio_to_base"] == 1.0
    assert all(r["seconds_per_batch"] > 0 and r["samples_per_second"] > 0 for r in rows)


def test_memory_runs_each_variant_in_its_own_process() -> None:
    rows = memory("tiny:bert", batch=2, length=8)
    assert [r["variant"] for r in rows] == list(MEMORY_VARIANTS)
    full, lora = rows[0], rows[1]
    assert full["trainable"] > 10 * lora["trainable"] > 0
    assert all(r["peak_bytes"] >= 0 for r in rows[:3])
    assert rows[3]["peak_bytes"] is None and "int8" in rows[3]["note"]


def test_bench_cli_writes_json_and_png(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        unipeft.cli.app,
        [
            "bench",
            "latency",
            "--output",
            str(tmp_path),
            "--model",
            "tiny:bert",
            "--batch",
            "2",
            "--length",
            "8",
            "--repeats",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "latency.json").read_text())
    assert data["model"] == "tiny:bert" and len(data["rows"]) == len(VARIANTS)
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unwritable_output_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UnipeftError, match="not writable"):
        check_writable(blocker / "sub")
    write_json(tmp_path / "ok.json", {"a": 1})
    assert json.loads((tmp_path / "ok.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_rank_sweep_fixes_each_rank(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        unipeft.cli.app,
        ["bench", "rank-sweep", "--output", str(tmp_path), "--ranks", "1,4", "--quick"],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "rank_sweep.json").read_text())["rows"]
    assert [r["rank"] for r in rows] == [1, 4]
    assert rows[0]["trainable_fraction"] < rows[1]["trainable_fraction"]
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    assert (tmp_path / "rank_sweep.png").exists()
    bad = CliRunner().invoke(
        unipeft.cli.app, ["bench", "rank-sweep", "--output", str(tmp_path), "--ranks", "a"]
    )
    assert bad.exit_code == 2 and "comma-separated integers" in bad.output
