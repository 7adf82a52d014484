"""``unipeft bench perf`` on models small enough for the CPU: every figure measured, ratios
consistent with the figures, unipeft and PEFT agreeing, and the command's errors."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import unipeft.cli
from unipeft.bench import perf, perf_steady, perf_timing

pytest.importorskip("peft")
pytest.importorskip("open_clip")

TINY_LLAMA = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 128,
    "vocab_size": 256,
}
TINY_CLIP = {"layers": 2, "width": 64, "head_width": 32, "patch_size": 16, "image_size": 32}


def tiny_config(**changes: Any) -> perf.PerfConfig:
    """The quick configuration, shrunk further: one timed round of everything."""
    base = replace(
        perf.quick_config("cpu"),
        llama=dict(TINY_LLAMA),
        batch=8,
        length=8,
        clip_vision=dict(TINY_CLIP),
        clip_batch=2,
        minilm_batch=2,
        minilm_length=8,
        repeats=1,
        warmup=0,
        apply_repeats=1,
        merge_repeats=1,
        steady_warmup=0,
        steady_steps=2,
    )
    return replace(base, **changes)


OPTIMIZERS: list[dict[str, Any]] = []  # the defaults of every AdamW the run below built


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    threads = torch.get_num_threads()
    original = perf_timing.adamw

    def spy(params: Any, **kw: Any) -> torch.optim.Optimizer:
        opt = original(params, **kw)
        OPTIMIZERS.append(opt.defaults)
        return opt

    with pytest.MonkeyPatch.context() as mp:
        for module in (perf, perf_steady):
            mp.setattr(module, "adamw", spy)
        out = perf.run_perf(tiny_config())
    assert torch.get_num_threads() == threads  # the run gives the thread count back
    return out


TRAIN = ("train_step_lora_qv", "train_step_lora_all_linear")
EXPECTED = {
    "train_step_floor",
    "train_step_full",
    *TRAIN,
    "train_step_dora_all_linear",
    "train_step_steady",
    "minilm_train_step_floor",
    "minilm_train_step_full",
    *(f"minilm_{name}" for name in TRAIN),
    "minilm_train_step_dora_all_linear",
    "inference_base",
    "inference_unmerged",
    "inference_merged",
    "merge_time",
    "mixed_batch",
    "mixed_batch_many",
    "mixed_batch_dora",
    "mixed_batch_dora_many",
    "open_clip_mha_lora",
    "apply_time",
    "train_step_catalogue",
}


def test_result_layout(result: dict[str, Any]) -> None:
    assert set(result) == {"environment", "config", "figures", "targets", "notes", "host_ms"}
    assert result["host_ms"] is None  # only CUDA runs time the host apart
    env = result["environment"]
    for key in ("torch", "transformers", "peft", "unipeft", "device_name", "cpu_count"):
        assert env[key], key
    cfg = result["config"]
    assert cfg["profile"] == "quick" and cfg["device"] == "cpu" and cfg["threads"] == 1
    assert cfg["model"]["class"] == "LlamaForCausalLM"
    assert cfg["model"]["config"] == TINY_LLAMA
    assert cfg["minilm"]["class"] == "BertModel"
    assert set(result["figures"]) == EXPECTED
    json.loads(json.dumps(result))  # plain JSON all the way down
    assert [(t["figure"], t["quantity"]) for t in result["targets"]] == [
        (t.figure, t.quantity) for t in perf.QUICK_TARGETS
    ]
    for t in result["targets"]:
        assert t["met"] == (t["value"] <= t["limit"])
        assert t["value"] == result["figures"][t["figure"]][t["quantity"]]


def _times(fig: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in fig.items() if k.endswith(("_ms", "_s")) or k == "ms"}


def test_every_figure_is_positive(result: dict[str, Any]) -> None:
    for name, fig in result["figures"].items():
        if name in ("train_step_catalogue", "train_step_steady"):  # their own tests below
            continue
        times = _times(fig)
        assert times, name
        for key, value in times.items():
            if isinstance(value, dict):  # per kernel: null where a kernel does not apply
                assert all(v is None or v > 0 for v in value.values()), (name, key)
                continue
            if value is None:  # only DoRA may be missing, and then it says why
                assert "dora" in name and ("note" in fig or fig.get("peft_mixed_refused")), (
                    name,
                    key,
                )
                continue
            assert value > 0, (name, key)
        # peak memory is a CUDA figure: null on the CPU, with a note
        for key in (k for k in fig if "peak" in k):
            assert fig[key] is None
    assert "memory_note" in result["figures"]["train_step_floor"]


def _close(ratio: float | None, a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return ratio is None
    return ratio == pytest.approx(a / b, rel=1e-12)


def test_ratios_are_quotients_of_the_figures(result: dict[str, Any]) -> None:
    figs = result["figures"]
    for pre in ("", "minilm_"):
        floor = figs[f"{pre}train_step_floor"]["ms"]
        full = figs[f"{pre}train_step_full"]
        assert _close(full["to_floor"], full["ms"], floor)
        for name in (*TRAIN, "train_step_dora_all_linear"):
            f = figs[pre + name]
            assert _close(f["unipeft_to_peft"], f["unipeft_ms"], f["peft_ms"])
            assert _close(f["unipeft_to_floor"], f["unipeft_ms"], floor)
            assert _close(f["peft_to_floor"], f["peft_ms"], floor)
        f = figs[f"{pre}train_step_lora_all_linear"]
        assert _close(f["unipeft_to_peft_native_dtype"], f["unipeft_ms"], f["peft_native_dtype_ms"])
        lora = figs[f"{pre}train_step_lora_all_linear"]
        dora = figs[f"{pre}train_step_dora_all_linear"]
        assert _close(dora["unipeft_to_unipeft_lora"], dora["unipeft_ms"], lora["unipeft_ms"])
        assert _close(dora["peft_to_peft_lora"], dora["peft_ms"], lora["peft_ms"])
    base = figs["inference_base"]["ms"]
    for kind in ("unmerged", "merged"):
        f = figs[f"inference_{kind}"]
        assert _close(f["unipeft_to_base"], f["unipeft_ms"], base)
        assert _close(f["peft_to_base"], f["peft_ms"], base)
        assert _close(f["unipeft_to_peft"], f["unipeft_ms"], f["peft_ms"])
    m = figs["merge_time"]
    assert _close(m["unipeft_to_peft"], m["unipeft_ms"], m["peft_ms"])
    mb = figs["mixed_batch"]
    assert mb["adapters"] == 8
    assert _close(mb["unipeft_mixed_to_single"], mb["unipeft_mixed_ms"], mb["unipeft_single_ms"])
    assert _close(mb["peft_mixed_to_single"], mb["peft_mixed_ms"], mb["peft_single_ms"])
    assert _close(mb["unipeft_to_peft"], mb["unipeft_mixed_ms"], mb["peft_mixed_ms"])
    oc = figs["open_clip_mha_lora"]
    assert _close(oc["unipeft_to_base"], oc["unipeft_ms"], oc["base_ms"])
    assert _close(oc["peft_to_base"], oc["peft_ms"], oc["base_ms"])
    ap = figs["apply_time"]
    assert _close(ap["unipeft_to_peft"], ap["unipeft_s"], ap["peft_s"])


def test_unipeft_and_peft_compute_the_same_lora(result: dict[str, Any]) -> None:
    figs = result["figures"]
    checks = [figs[pre + name]["agreement"] for pre in ("", "minilm_") for name in TRAIN]
    checks += [
        figs["train_step_lora_all_linear"]["agreement_native_dtype"],
        figs["inference_unmerged"]["agreement"],
        figs["mixed_batch"]["agreement"],
    ]
    for agree in checks:
        assert agree["max_abs_diff"] <= 1e-5
    for pre in ("", "minilm_"):
        for name in TRAIN:
            # the randomised B moves the output far more than the two libraries differ
            assert figs[pre + name]["agreement"]["lora_effect_max_abs"] > 1e-2
    merged = figs["inference_merged"]["agreement"]
    assert max(merged.values()) <= 1e-4
    assert (
        figs["train_step_lora_all_linear"]["unipeft_trainable"]
        == (figs["train_step_lora_all_linear"]["peft_trainable"])
    )


def test_report_tables(result: dict[str, Any]) -> None:
    sections = perf.report_sections(result)
    titles = [s.title for s in sections]
    assert titles[:2] == ["training step, Llama", "training step, MiniLM"]
    assert {"inference, Llama", "apply, Llama"} <= set(titles)
    assert any(t.startswith("mixed batch, ") for t in titles)
    marks = [m for s in sections for r in s.rows if r.met for m in r.met.split("; ")]
    assert len(marks) == len(perf.QUICK_TARGETS)
    assert all(m in ("met", "missed") for m in marks)


def test_missing_unipeft_dora_is_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(perf, "DORA", "no_such_method")
    out = perf.run_perf(tiny_config(sections=("train",), minilm=False))
    dora = out["figures"]["train_step_dora_all_linear"]
    assert dora["unipeft_ms"] is None and dora["unipeft_to_unipeft_lora"] is None
    assert dora["peft_ms"] > 0
    assert "unipeft DoRA not available" in dora["note"] and "no_such_method" in dora["note"]
    full = {(t["figure"], t["met"]) for t in perf._check_targets("full", out["figures"])}
    assert ("train_step_dora_all_linear", None) in full


# ------------------------------------------------------------------------------ the command


def _cli(*args: str) -> Any:
    return CliRunner().invoke(unipeft.cli.app, ["bench", "perf", *args])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_measures_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = tiny_config(minilm=False)
    monkeypatch.setattr(perf, "quick_config", lambda device, repeats=None: small)
    out = tmp_path / "perf.json"
    result = _cli("--device", "cuda", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert "CUDA is not available" in result.output
    assert "GPU figures cannot be measured here" in result.output
    assert "training step, Llama" in result.output and "targets:" in result.output
    data = json.loads(out.read_text())
    assert data["config"]["device"] == "cpu" and data["config"]["profile"] == "quick"
    assert data["figures"]["apply_time"]["unipeft_s"] > 0


def test_missing_peft_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(perf.PeftMissingError, match=r"unipeft\[bench\]"):
        perf.run_perf(tiny_config())
    result = _cli("--quick")
    assert result.exit_code == 2
    assert "pip install 'unipeft[bench]'" in result.output
    assert "Traceback" not in result.output


def _refuse_to_run(*_args: Any, **_kwargs: Any) -> None:
    raise AssertionError("measured despite bad input")


def test_unwritable_output_fails_before_measuring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(perf, "run_perf", _refuse_to_run)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = _cli("--quick", "--output", str(blocker / "sub" / "perf.json"))
    assert result.exit_code == 2 and "not writable" in result.output
    result = _cli("--quick", "--output", str(tmp_path))
    assert result.exit_code == 2 and "is a folder" in result.output
    result = _cli("--quick", "--device", "tpu")
    assert result.exit_code == 2 and "use cpu or cuda" in result.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_measures_memory_and_host_time() -> None:
    out = perf.run_perf(tiny_config(device="cuda", minilm=False))
    figs = out["figures"]
    assert out["config"]["dtype"] == "bfloat16"
    floor = figs["train_step_floor"]["peak_gib"]
    assert floor > 0 and figs["train_step_full"]["peak_gib"] > floor
    lora = figs["train_step_lora_all_linear"]
    assert lora["unipeft_peak_gib"] > 0 and lora["peft_peak_gib"] > 0
    assert lora["unipeft_peak_to_floor"] == pytest.approx(lora["unipeft_peak_gib"] / floor)
    assert (
        lora["agreement_native_dtype"]["max_abs_diff"]
        < 0.1 * (lora["agreement"]["lora_effect_max_abs"])
    )
    assert set(out["host_ms"]) >= {"llama_train_step", "llama_inference", "open_clip"}
    assert all(v > 0 for section in out["host_ms"].values() for v in section.values())


def test_cuda_graph_section_needs_cuda() -> None:
    """On the CPU the CUDA-graph section measures nothing and adds no figure."""
    out = perf.run_perf(tiny_config(sections=("cuda_graphs",), minilm=False))
    assert "train_step_cuda_graph" not in out["figures"]
    assert all(s.title != "CUDA graphs (device time), Llama" for s in perf.report_sections(out))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_section_captures_every_variant() -> None:
    out = perf.run_perf(tiny_config(device="cuda", sections=("cuda_graphs",), minilm=False))
    train = out["figures"]["train_step_cuda_graph"]
    infer = out["figures"]["inference_unmerged_cuda_graph"]
    assert not train["notes"] and not infer["notes"]  # every capture succeeded
    assert train["floor_ms"] > 0 and train["unipeft_ms"] > 0 and train["peft_ms"] > 0
    assert train["unipeft_to_floor"] == pytest.approx(train["unipeft_ms"] / train["floor_ms"])
    assert infer["unipeft_to_base"] == pytest.approx(infer["unipeft_ms"] / infer["base_ms"])
    titles = [s.title for s in perf.report_sections(out)]
    assert "CUDA graphs (device time), Llama" in titles


def test_catalogue_section_compares_the_same_adapters(result: dict[str, Any]) -> None:
    rows = result["figures"]["train_step_catalogue"]["methods"]
    assert set(rows) == {"vera", "loha", "lokr", "oft", "boft", "adalora", "ia3"}
    for method, row in rows.items():
        assert "note" not in row, f"{method}: {row.get('note')}"
        assert row["unipeft_ms"] > 0 and row["peft_ms"] > 0
        assert row["unipeft_trainable"] == row["peft_trainable"], method
        assert row["adapter_effect"] > 1e-4, f"{method}: the adapter changes nothing"
        assert row["max_abs_diff"] < 1e-4, f"{method}: the libraries disagree"
    titles = [s.title for s in perf.report_sections(result)]
    assert "catalogue training step, Llama, all linear" in titles


# -------------------------------------------------------------- steady state, the optimizer


def test_steady_figures(result: dict[str, Any]) -> None:
    f = result["figures"]["train_step_steady"]
    assert f["steps"] == 2 and f["warmup"] == 0 and not f["notes"]
    variants = {"floor", "full", "peft_native_lora_all"}
    variants |= {f"{lib}_{v}" for lib in ("unipeft", "peft") for v in ("lora_qv", "lora_all")}
    assert set(f["mean_ms"]) == variants | {"unipeft_dora", "peft_dora"}
    assert all(v > 0 for v in f["mean_ms"].values())
    assert f["floor_ms"] > 0 and _close(f["full_to_floor"], f["full_ms"], f["floor_ms"])
    for key in ("lora_qv", "lora_all_linear", "dora"):
        pair = f[key]
        assert pair["unipeft_ms"] > 0 and pair["peft_ms"] > 0, key
        assert _close(pair["unipeft_to_floor"], pair["unipeft_ms"], f["floor_ms"])
        assert _close(pair["peft_to_floor"], pair["peft_ms"], f["floor_ms"])
        assert _close(pair["unipeft_to_peft"], pair["unipeft_ms"], pair["peft_ms"])
    native = f["lora_all_linear"]["peft_native_dtype_ms"]
    assert _close(f["lora_all_linear"]["peft_native_dtype_to_floor"], native, f["floor_ms"])
    titles = [s.title for s in perf.report_sections(result)]
    assert "training step, steady state (each variant alone, 2 steps), Llama" in titles


def test_every_training_variant_steps_with_fused_adamw(result: dict[str, Any]) -> None:
    # Llama and MiniLM training sections and the steady section: one AdamW per variant
    # but the floor, 8 variants each; the catalogue builds its own
    assert len(OPTIMIZERS) == 3 * 8
    assert all(d["fused"] is True and d["lr"] == perf_timing.LR for d in OPTIMIZERS)
    opt = result["config"]["optimizer"]
    assert opt["class"] == "torch.optim.AdamW" and opt["fused"] is True and opt["on"] == "cpu"


def test_steady_timer_runs_every_step() -> None:
    calls: list[int] = []
    out = perf_timing.time_steady(lambda: calls.append(1), device="cpu", warmup=2, steps=5)
    assert len(calls) == 7
    assert min(out["median_ms"], out["mean_ms"], out["first_call_ms"]) >= 0
    cold = perf_timing.time_steady(lambda: None, device="cpu", warmup=0, steps=1)
    assert cold["first_call_ms"] is None
