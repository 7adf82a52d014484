"""The CUDA-graph section of ``unipeft bench perf``: the training step (fused, capturable AdamW)
and unmerged inference captured as CUDA graphs and replayed, for both libraries, so the
figures show device time without the host's kernel launches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .perf_report import _ratio
from .perf_setup import (
    DORA,
    PerfConfig,
    Progress,
    Workload,
    _free,
    _frozen_floor,
    _peft_lora,
    _randomised,
    _unipeft_lora,
    time_interleaved,
)
from .perf_timing import adamw


def _capture(fn: Callable[[], Any], warmup: int) -> Callable[[], None]:
    """``fn`` captured as one CUDA graph; the returned callable replays it."""
    from ..training.graphs import capture

    return capture(fn, warmup)[0].replay


def _graph_section(
    work: Workload, cfg: PerfConfig, progress: Progress, host: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """The training step and the unmerged forward captured as CUDA graphs, so the host's
    kernel launches drop out and what is left is device time: frozen-base floor, LoRA on
    every linear layer (both libraries), unipeft's DoRA; base and unmerged LoRA inference.
    AdamW runs fused with ``capturable=True`` inside the graph; should a fused step refuse
    capture, the variant is captured again with the foreach AdamW, and a note says so."""
    if cfg.device != "cuda":
        return {}
    steps: dict[str, Callable[[], None]] = {}
    forwards: dict[str, Callable[[], None]] = {}
    notes: dict[str, str] = {}
    keep: list[Any] = []

    def fresh() -> nn.Module:
        return copy.deepcopy(work.model)

    def train(model: nn.Module, fused: bool = True) -> Callable[[], None]:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = None
        if params:
            opt = (
                adamw(params, capturable=True)
                if fused
                else torch.optim.AdamW(params, lr=1e-5, capturable=True, foreach=True)
            )
        keep.append((model, opt))

        def step() -> None:
            if opt is not None:  # backward creates the gradients inside the graph
                opt.zero_grad(set_to_none=True)
            work.loss(model(**work.train_inputs)).backward()
            if opt is not None:
                opt.step()

        return step

    def infer(model: nn.Module) -> Callable[[], None]:
        model.eval()
        keep.append(model)

        def run() -> None:
            with torch.no_grad():
                model(**work.inputs)

        return run

    builders: dict[str, Callable[[], nn.Module]] = {
        "floor": lambda: _frozen_floor(fresh()),
        "unipeft_lora": lambda: _randomised(_unipeft_lora(fresh(), cfg, work.all_linear), cfg),
        "peft_lora": lambda: _peft_lora(fresh(), cfg, work.all_linear),
        "unipeft_dora": lambda: _unipeft_lora(fresh(), cfg, work.all_linear, method=DORA),
    }
    progress(f"{work.name}: capturing CUDA graphs")
    for name, build in builders.items():
        for fused in (True, False):
            kept = len(keep)
            try:
                steps[name] = _capture(train(build(), fused), cfg.warmup + 1)
                break
            except Exception as exc:  # report, do not fail: capture is a property of the code
                how = "fused AdamW" if fused else "foreach AdamW"
                notes[f"train_{name}"] = (
                    notes.get(f"train_{name}", "") + f"capture with {how} failed: "
                    f"{type(exc).__name__}: {exc}; "
                )
                del keep[kept:]  # the failed variant's model and optimizer only
                _free(cfg.device)
    infer_builders: dict[str, Callable[[], nn.Module]] = {
        "base": fresh,
        "unipeft_lora": builders["unipeft_lora"],
        "peft_lora": builders["peft_lora"],
    }
    for name, build in infer_builders.items():
        try:
            forwards[name] = _capture(infer(build()), cfg.warmup + 1)
        except Exception as exc:
            notes[f"inference_{name}"] = f"capture failed: {type(exc).__name__}: {exc}"
    progress(f"{work.name}: timing graph replays")
    t = time_interleaved(steps, device=cfg.device, warmup=cfg.warmup, repeats=cfg.repeats)
    i = time_interleaved(forwards, device=cfg.device, warmup=cfg.warmup, repeats=cfg.repeats)
    # (an empty dict of variants, every capture failed, times nothing)
    steps.clear()
    forwards.clear()
    keep.clear()
    _free(cfg.device)
    floor, base = t.get("floor"), i.get("base")
    return {
        "train_step_cuda_graph": {
            "what": "the training step (forward, backward, fused AdamW with capturable=True) "
            "of LoRA r=16 on every linear layer, captured as one CUDA graph and replayed: device "
            "time without the host's launches",
            "floor_ms": floor,
            "unipeft_ms": t.get("unipeft_lora"),
            "peft_ms": t.get("peft_lora"),
            "unipeft_dora_ms": t.get("unipeft_dora"),
            "unipeft_to_floor": _ratio(t.get("unipeft_lora"), floor),
            "peft_to_floor": _ratio(t.get("peft_lora"), floor),
            "unipeft_to_peft": _ratio(t.get("unipeft_lora"), t.get("peft_lora")),
            "unipeft_dora_to_unipeft_lora": _ratio(t.get("unipeft_dora"), t.get("unipeft_lora")),
            "notes": {k: v for k, v in notes.items() if k.startswith("train_")},
        },
        "inference_unmerged_cuda_graph": {
            "what": "the no-grad forward of the base and of unmerged LoRA on every linear "
            "layer, captured as one CUDA graph and replayed",
            "base_ms": base,
            "unipeft_ms": i.get("unipeft_lora"),
            "peft_ms": i.get("peft_lora"),
            "unipeft_to_base": _ratio(i.get("unipeft_lora"), base),
            "peft_to_base": _ratio(i.get("peft_lora"), base),
            "unipeft_to_peft": _ratio(i.get("unipeft_lora"), i.get("peft_lora")),
            "notes": {k: v for k, v in notes.items() if k.startswith("inference_")},
        },
    }
