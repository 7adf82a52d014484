"""The catalogue section of ``unipeft bench perf``: the training step and peak memory of
methods beyond LoRA, unipeft against Hugging Face PEFT, on the Llama's every linear layer.

For each method, unipeft's adapter is built and its trainable tensors randomised (so that no
method sits at its identity), then written as a PEFT folder with
:func:`unipeft.interop.peft.save` and loaded by ``peft.PeftModel.from_pretrained`` (with
``is_trainable=True`` and PEFT's defaults otherwise): both libraries then hold the same
adapter, and the largest difference of their outputs is reported beside the timings.
Each variant's step is forward, backward and an AdamW step, timed in interleaved rounds
like the other sections. AdaLoRA's rank allocator runs in both: unipeft's from autograd
at the end of each backward pass, PEFT's through ``update_and_allocate`` in the step, as
PEFT's documentation asks.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import unipeft
from unipeft.features.interop import peft as interop

from .perf_report import _ratio
from .perf_setup import (
    PerfConfig,
    Progress,
    Workload,
    _free,
    _gib,
    _peak_bytes,
    _state_bytes,
    _trainable,
    require_peft,
    time_interleaved,
)
from .perf_timing import adamw

# method id -> unipeft's config fields, chosen to match PEFT's usual settings for the method
CATALOGUE: dict[str, dict[str, Any]] = {
    "vera": {"r": 256},
    "loha": {"r": 16, "alpha": 32.0},
    "lokr": {"r": 16, "alpha": 32.0},
    "oft": {"oft_block_size": 32},
    "boft": {"boft_block_size": 8},  # one factor: PEFT builds more only with its CUDA extension
    "adalora": {"init_r": 12, "target_r": 8, "total_step": 1000, "tinit": 10, "tfinal": 10},
    "ia3": {},  # feed-forward (input-side) scaling on mlp.down, output-side elsewhere
}


def _randomise(model: nn.Module, seed: int, std: float = 0.01) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=gen) * std
                p.add_(noise.to(device=p.device, dtype=p.dtype))


def _pair(work: Workload, cfg: PerfConfig, method: str, fields: dict[str, Any]) -> tuple[Any, Any]:
    """unipeft's adapter and PEFT's copy of it, both trainable."""
    peft = require_peft()
    targets = work.all_linear.unipeft
    um = unipeft.apply(copy.deepcopy(work.model), method, targets=targets, **fields)
    _randomise(um.deltas, cfg.seed)
    with tempfile.TemporaryDirectory() as folder:
        interop.save(um, folder)
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(work.model), folder, is_trainable=True)
    return um, pm


def _agreement(um: Any, pm: nn.Module, work: Workload) -> tuple[float, float]:
    """The largest difference between the two libraries' outputs, and between unipeft's
    and the base model's (the adapter's effect: the comparison is not of two identities)."""
    with torch.no_grad():
        a = um(**work.inputs).logits.float()
        b = pm(**work.inputs).logits.float()
        with um.disable():
            base = um(**work.inputs).logits.float()
    return float((a - b).abs().max()), float((a - base).abs().max())


def _step(model: nn.Module, work: Workload, adalora_peft: bool) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params)
    count = [0]

    def step() -> None:
        loss = work.loss(model(**work.train_inputs))
        loss.backward()
        opt.step()
        if adalora_peft:
            count[0] += 1
            model.base_model.update_and_allocate(count[0])
        opt.zero_grad(set_to_none=True)

    step.opt = opt  # type: ignore[attr-defined]
    return step


def catalogue_section(
    work: Workload, cfg: PerfConfig, progress: Progress, host: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """``train_step_catalogue``: per method, step time and peak memory of both libraries."""
    dev = cfg.device
    models: dict[str, nn.Module] = {}
    steps: dict[str, Callable[[], None]] = {}
    agree: dict[str, tuple[float, float]] = {}
    notes: dict[str, str] = {}
    for method, fields in CATALOGUE.items():
        try:
            um, pm = _pair(work, cfg, method, fields)
        except Exception as exc:  # report, do not fail the run
            notes[method] = f"{type(exc).__name__}: {exc}"
            continue
        agree[method] = _agreement(um, pm, work)
        for lib, model in (("unipeft", um), ("peft", pm)):
            model.train()
            models[f"{lib}_{method}"] = model
            steps[f"{lib}_{method}"] = _step(model, work, lib == "peft" and method == "adalora")
    progress(f"{work.name}: timing {len(steps)} catalogue training-step variants")
    ms = time_interleaved(
        steps, device=dev, warmup=cfg.warmup, repeats=cfg.repeats,
        host=host.setdefault(f"{work.name}_catalogue", {}),
    )  # fmt: skip
    peak: dict[str, int | None] = dict.fromkeys(steps)
    if dev == "cuda":
        for name, step in steps.items():
            resident = _state_bytes(models[name], step.opt)  # type: ignore[attr-defined]
            peak[name] = _peak_bytes(step, resident)
    rows: dict[str, Any] = {}
    for method in CATALOGUE:
        if method in notes:
            rows[method] = {"note": notes[method]}
            continue
        u, p = f"unipeft_{method}", f"peft_{method}"
        rows[method] = {
            "config": CATALOGUE[method],
            "unipeft_ms": ms[u],
            "peft_ms": ms[p],
            "unipeft_to_peft": _ratio(ms[u], ms[p]),
            "unipeft_peak_gib": _gib(peak[u]),
            "peft_peak_gib": _gib(peak[p]),
            "peak_unipeft_to_peft": _ratio(_gib(peak[u]), _gib(peak[p])),
            "unipeft_trainable": _trainable(models[u]),
            "peft_trainable": _trainable(models[p]),
            "max_abs_diff": agree[method][0],
            "adapter_effect": agree[method][1],
        }
    del steps, models
    _free(dev)
    return {
        "train_step_catalogue": {
            "what": "forward + backward + AdamW step, every linear layer of the blocks; "
            "PEFT loads unipeft's randomised adapter through the PEFT interop (its defaults: "
            "adapter weights in fp32 on a bf16 model)",
            "methods": rows,
        }
    }
