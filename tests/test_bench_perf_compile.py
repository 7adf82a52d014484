"""``unipeft bench perf``'s compile section on CPU-sized models: graph breaks counted and
placed, ratios that are the quotients of the figures, a compile failure recorded rather than
raised; the command's section options."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from test_bench_perf import tiny_config
from typer.testing import CliRunner

import unipeft.cli
from unipeft.bench import perf, perf_steady

pytest.importorskip("peft")


def _quotient(ratio: float | None, a: float | None, b: float | None) -> bool:
    return ratio is None if a is None or b is None else ratio == pytest.approx(a / b)


def _compiled(cfg: perf.PerfConfig) -> dict[str, Any]:
    return perf.run_perf(cfg)["figures"]["train_step_compiled"]


class _Breaks(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        y = input_ids * 2
        print(end="")  # dynamo cannot trace print: one graph break
        return y + 1


def test_graph_breaks_are_counted_with_their_place() -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.compile(_Breaks(), backend="eager")(torch.ones(3))
    found = perf_steady._breaks()
    assert found["graph_breaks"] == 1 and sum(found["break_reasons"].values()) == 1
    work = type("W", (), {"train_inputs": {"input_ids": torch.ones(3)}})()
    sites = perf_steady._break_sites(_Breaks(), work)  # type: ignore[arg-type]
    assert len(sites) == 1
    where = next(iter(sites))
    assert "test_bench_perf_compile.py:" in where and "(forward)" in where
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_section_counts_graph_breaks() -> None:
    """The eager backend: dynamo traces and counts, nothing is code-generated."""
    cfg = tiny_config(sections=("compile",), minilm=False, compile_backend="eager")
    f = _compiled(replace(cfg, steady_warmup=1, steady_steps=1))
    assert f["backend"] == "eager"
    assert set(f["variants"]) == set(perf_steady.COMPILED)
    for name, v in f["variants"].items():
        assert v["error"] is None, (name, v["error"])
        assert v["ms"] > 0 and v["first_step_s"] > 0 and v["unique_graphs"] >= 1
        assert v["graph_breaks"] == sum(v["break_reasons"].values())
        assert _quotient(v["to_floor"], v["ms"], f["floor_ms"])
    # the compiled floor is one graph: the zero scalar, not requires_grad_, feeds backward
    assert f["variants"]["floor"]["graph_breaks"] == 0
    lora = f["lora_all_linear"]
    assert lora["unipeft_ms"] == f["variants"]["unipeft_lora_all"]["ms"]
    assert _quotient(lora["unipeft_to_peft"], lora["unipeft_ms"], lora["peft_ms"])
    # PEFT's DoRA breaks the graph; where is recorded as file:line
    peft_dora = f["variants"]["peft_dora"]
    assert peft_dora["graph_breaks"] > 0
    assert any(".py:" in site for site in peft_dora["break_sites"])


def test_block_scope_compiles_each_block(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[str] = []
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kw: compiled.append(type(self).__name__)
    )
    monkeypatch.setattr(torch, "compile", _refuse_all)
    cfg = tiny_config(sections=("compile",), minilm=False, steady_warmup=1, steady_steps=1)
    f = _compiled(replace(cfg, compile_scope="blocks"))
    assert f["scope"] == "blocks"
    assert all(v["error"] is None and v["ms"] > 0 for v in f["variants"].values())
    layers = cfg.llama["num_hidden_layers"]
    assert compiled == ["LlamaDecoderLayer"] * layers * len(perf_steady.COMPILED)


def _refuse_all(*_args: Any, **_kw: Any) -> Any:
    raise AssertionError("the whole model was compiled")


def test_compile_failure_is_recorded_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(model: Any, **_kw: Any) -> Any:
        if not hasattr(model, "_floor_zero"):  # every variant but the floor
            raise RuntimeError("no compiler for adapters today")
        return model

    monkeypatch.setattr(torch, "compile", refuse)
    cfg = tiny_config(sections=("compile",), minilm=False, steady_warmup=1, steady_steps=1)
    out = perf.run_perf(cfg)
    f = out["figures"]["train_step_compiled"]
    assert f["variants"]["floor"]["error"] is None and f["floor_ms"] > 0
    for name in ("unipeft_lora_all", "peft_lora_all", "unipeft_dora", "peft_dora"):
        v = f["variants"][name]
        assert v["ms"] is None and v["to_floor"] is None
        assert v["error"] == "RuntimeError: no compiler for adapters today"
    assert f["lora_all_linear"]["unipeft_to_floor"] is None
    rows = [r for s in perf.report_sections(out) for r in s.rows]
    assert any("failed" in r.figure for r in rows)


def test_perf_sections_option(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[perf.PerfConfig] = []
    monkeypatch.setattr(perf, "run_perf", lambda cfg, progress=None: seen.append(cfg) or 1 / 0)
    run = CliRunner().invoke
    result = run(unipeft.cli.app, ["bench", "perf", "--quick", "--sections", "train,nope"])
    assert result.exit_code == 2 and "choose from" in result.output and not seen
    args = ["bench", "perf", "--quick", "--sections", "steady,compile", "--steady-steps", "4"]
    run(unipeft.cli.app, [*args, "--compile-backend", "eager", "--compile-scope", "blocks"])
    assert seen[0].sections == ("steady", "compile")
    assert seen[0].steady_steps == 4 and seen[0].compile_backend == "eager"
    assert seen[0].compile_scope == "blocks"
    result = run(unipeft.cli.app, [*args, "--compile-scope", "layer"])
    assert result.exit_code == 2 and "use model or blocks" in result.output and len(seen) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_steady_and_compiled_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    # inductor compiles take a while even for tiny models: DoRA is left to the bench run
    monkeypatch.setattr(perf_steady, "COMPILED", ("floor", "unipeft_lora_all", "peft_lora_all"))
    cfg = tiny_config(device="cuda", sections=("steady", "compile"), minilm=False)
    out = perf.run_perf(replace(cfg, steady_warmup=2, steady_steps=3))
    steady = out["figures"]["train_step_steady"]
    assert not steady["notes"] and steady["lora_all_linear"]["unipeft_to_floor"] > 0
    compiled = out["figures"]["train_step_compiled"]
    assert compiled["backend"] == "inductor" and compiled["floor_ms"] > 0
    assert compiled["variants"]["floor"]["graph_breaks"] == 0
    for name in ("unipeft_lora_all", "peft_lora_all"):
        assert compiled["variants"][name]["error"] is None, compiled["variants"][name]["error"]
        assert compiled["variants"][name]["to_floor"] > 0
