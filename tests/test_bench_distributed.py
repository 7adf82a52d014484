"""`unipeft bench distributed`: the --quick CPU run (torchrun, gloo) through the CLI, its
rows checked against single-process references computed here; option checks; the plan;
the full fine-tuning estimate."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from _once import made_once
from typer.testing import CliRunner

import unipeft.cli
from unipeft.bench.distributed import BenchConfig, full_finetune, make_config, plan
from unipeft.bench.distributed_worker import TINY, RunSpec, build_base, global_batches, train_run
from unipeft.contract.errors import ConfigError

pytest.importorskip("peft")

QUICK = {"batch": 2, "length": 32, "steps": 3, "warmup": 1}  # --quick's defaults


def _lora_parameters(shape: dict[str, int], r: int = 16) -> int:
    """r * (in + out) summed over q, k, v, o, gate, up, down of every layer."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h)
    return r * per_layer * shape["num_hidden_layers"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    def produce(folder: Path) -> None:
        result = CliRunner().invoke(
            unipeft.cli.app, ["bench", "distributed", "--quick", "--out", str(folder / "dist.json")]
        )
        assert result.exit_code == 0, result.output
        (folder / "output.txt").write_text(result.output)

    folder = made_once(tmp_path_factory, "bench-distributed", produce)
    output = (folder / "output.txt").read_text()
    assert "tok/s" in output and "full fine-tuning" in output
    return json.loads((folder / "dist.json").read_text())


def _row(data: dict[str, Any], library: str, engine: str, world: int) -> dict[str, Any]:
    (row,) = [
        r
        for r in data["rows"]
        if (r["library"], r["engine"], r["world_size"]) == (library, engine, world)
    ]
    return row


def test_quick_run_has_every_config_with_figures(quick: dict[str, Any]) -> None:
    got = {(r["library"], r["engine"], r["world_size"], r["model"]) for r in quick["rows"]}
    want = {
        (lib, eng, n, "tiny")
        for lib in ("unipeft", "peft")
        for eng, n in (("single", 1), ("fsdp2", 1), ("ddp", 2), ("fsdp2", 2))
    }
    assert got == want and len(quick["rows"]) == len(want) and quick["failures"] == []
    expected_trainable = _lora_parameters(TINY)
    base = build_base(RunSpec("unipeft", "single", "tiny"), torch.device("cpu"))
    for r in quick["rows"]:
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(
            r["batch"] * r["world_size"] * r["length"] / r["step_s"]
        )
        assert len(r["step_times_s"]) == QUICK["steps"] + QUICK["warmup"]
        assert r["trainable"] == expected_trainable
        assert r["parameters"] == sum(p.numel() for p in base.parameters())
        assert r["peak_bytes"] is None  # no CUDA memory on the CPU
    assert len(quick["pairs"]) == 4
    assert all(p["tokens_per_s_ratio"] > 0 for p in quick["pairs"])
    assert quick["full_finetune"]["tiny"]["recipes"]  # computed from the parameter count


def _base_loss(world: int) -> float:
    spec = RunSpec("unipeft", "single", "tiny", **QUICK)
    model = build_base(spec, torch.device("cpu"))
    ids = global_batches(spec, world, 1)[0]
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_step0_loss_is_the_base_loss_for_both_libraries(quick: dict[str, Any]) -> None:
    """B starts at zero in both libraries: the first loss is the base model's."""
    for world in (1, 2):
        base = _base_loss(world)
        for r in quick["rows"]:
            if r["world_size"] == world:
                assert r["losses"][0] == pytest.approx(base, rel=1e-5), r["engine"]


def test_two_processes_train_as_one_on_the_same_global_batch(quick: dict[str, Any]) -> None:
    """Every engine over 2 processes with 2 sequences each ends where one process with the
    same 4 sequences per step ends (computed here); 1-process FSDP2 as the plain process;
    PEFT as unipeft (the same seeded A)."""
    for library in ("unipeft", "peft"):
        ref4 = train_run(RunSpec(library, "single", "tiny", **{**QUICK, "batch": 4}))
        ref2 = _row(quick, library, "single", 1)
        assert ref4["loss_after"] < ref4["losses"][0]  # the steps trained something
        for engine, world, ref in (("ddp", 2, ref4), ("fsdp2", 2, ref4), ("fsdp2", 1, ref2)):
            r = _row(quick, library, engine, world)
            assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6), engine
            assert r["loss_after"] == pytest.approx(ref["loss_after"], rel=1e-5), engine
    for engine, world in (("single", 1), ("fsdp2", 1), ("ddp", 2), ("fsdp2", 2)):
        u, p = _row(quick, "unipeft", engine, world), _row(quick, "peft", engine, world)
        assert u["losses"] == pytest.approx(p["losses"], rel=1e-5)
        assert u["loss_after"] == pytest.approx(p["loss_after"], rel=1e-5)


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        make_config(quick=True, engines="single,zero9")
    with pytest.raises(ConfigError, match="at least 1"):
        make_config(quick=True, gpus="0,2")
    with pytest.raises(ConfigError, match="runs nothing"):
        make_config(quick=True, engines="ddp", gpus="1")
    with pytest.raises(ConfigError, match="unknown"):
        make_config(quick=True, models="70b")
    cfg = make_config(quick=True)
    assert (cfg.device, cfg.models, cfg.batch, cfg.length) == ("cpu", ("tiny",), 2, 32)
    result = CliRunner().invoke(
        unipeft.cli.app, ["bench", "distributed", "--quick", "--libraries", "peft,hf"]
    )
    assert result.exit_code == 2 and "hf" in result.output


def test_plan_one_launch_per_run_on_the_gpu_grouped_on_the_cpu() -> None:
    cfg = BenchConfig(models=("llama", "8b"), device="cuda")
    gpu = plan(cfg)
    assert len(gpu) == 2 * 4 * 2 and all(len(la.runs) == 1 for la in gpu)
    assert {(la.processes, la.runs[0][1]) for la in gpu} == {
        (1, "single"),
        (1, "fsdp2"),
        (2, "ddp"),
        (2, "fsdp2"),
    }
    cpu = plan(BenchConfig(models=("tiny",), device="cpu"))
    assert [(la.processes, len(la.runs)) for la in cpu] == [(1, 4), (2, 4)]


def test_full_finetune_estimate_is_computed_from_the_parameter_count() -> None:
    row = {
        "model": "8b", "world_size": 1, "parameters": 8_030_261_248, "batch": 8, "length": 512,
        "peak_bytes": 60 * 2**30, "resident_bytes": 15 * 2**30, "device_total_bytes": 140 * 2**30,
    }  # fmt: skip
    est = full_finetune([row, {**row, "world_size": 2}])["8b"]
    fp32, bf16 = est["recipes"].values()
    assert fp32["state_bytes"] == 16 * row["parameters"]
    assert bf16["state_bytes"] == 12 * row["parameters"]
    assert est["activation_bytes_lower_bound"] == 45 * 2**30
    assert fp32["fits_one_gpu"] is False  # 119.7 + 45 GiB > 140 GiB
    assert bf16["fits_one_gpu"] is True  # 89.7 + 45 GiB <= 140 GiB


@pytest.mark.gpu
def test_quick_bench_on_one_gpu(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = tmp_path / "dist.json"
    result = CliRunner().invoke(
        unipeft.cli.app,
        ["bench", "distributed", "--quick", "--device", "cuda", "--gpus", "1", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert {(r["library"], r["engine"]) for r in data["rows"]} == {
        (lib, eng) for lib in ("unipeft", "peft") for eng in ("single", "fsdp2")
    }
    for r in data["rows"]:
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] > r["resident_bytes"] > 0
        assert r["adapter_dtype"] == "bfloat16" and "AdamW" in r["optimizer"]
        assert r["trainable"] == _lora_parameters(TINY)
    single = _row(data, "unipeft", "single", 1)
    for r in data["rows"]:  # bf16: the first loss (B = 0) agrees to bf16 rounding
        assert r["losses"][0] == pytest.approx(single["losses"][0], rel=1e-2)
        assert r["loss_after"] == pytest.approx(single["loss_after"], rel=2e-2)
    est = data["full_finetune"]["tiny"]
    assert est["gpu_total_bytes"] > 0 and est["activation_bytes_lower_bound"] > 0
