"""``unipeft bench perf``: unipeft and Hugging Face PEFT measured in one process, side by side.

Every figure is measured for both libraries on copies of one model (same weights, same
inputs), in interleaved rounds: each round runs every variant of a section once, starting
from a different variant each round, after warm-up rounds; the figure is the median over the
rounds. On CUDA a run is timed with CUDA events and a synchronize, on the CPU with
``time.perf_counter``.

Sections:

* training step (forward, backward, fused AdamW step; the same loss for every variant): the
  frozen-base *floor* (every weight frozen, the embedding output made to require grad, so
  backward runs through every layer but computes no weight gradient and nothing is
  optimised), full fine-tuning, LoRA on q,v, LoRA on every linear layer, DoRA on every
  linear layer; peak memory on CUDA;
* inference: the base, LoRA unmerged and merged, and the time to merge;
* mixed batch: 8 adapters loaded, sample ``i`` through adapter ``i``, against the same
  model's single-adapter forward;
* open_clip: LoRA on the image tower's ``nn.MultiheadAttention`` against the plain tower;
* apply: ``unipeft.apply`` against ``peft.get_peft_model``;
* catalogue: the training step and peak memory of VeRA, LoHa, LoKr, OFT, BOFT, AdaLoRA and
  (IA)³ on every linear layer, each library holding the same adapter
  (:mod:`unipeft.bench.perf_catalogue`).

* steady state and torch.compile: the training step of each variant alone, back-to-back
  steps after warm-up, eager and compiled (:mod:`unipeft.bench.perf_steady`).

This module holds the training, inference, mixed-batch and apply sections and the run;
:mod:`unipeft.bench.perf_clip` and :mod:`unipeft.bench.perf_graphs` the open_clip and
CUDA-graph sections; :mod:`unipeft.bench.perf_setup` the
configurations, targets, timers, workloads and adapters; :mod:`unipeft.bench.perf_report`
the printed tables.

Before timing LoRA, both libraries get the same factors (``B`` randomised, since it starts
at zero) and their outputs are compared; the largest difference is part of the result.
"""

from __future__ import annotations

import copy
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from statistics import median
from typing import Any

import torch
from torch import nn

import unipeft

from .perf_catalogue import catalogue_section
from .perf_clip import _clip_section
from .perf_graphs import _graph_section
from .perf_mixed import mixed_section
from .perf_report import _ratio, report_sections
from .perf_setup import (
    ADAPTER,
    DORA,
    FULL_TARGETS,
    QUICK_TARGETS,
    PeftMissingError,
    PerfConfig,
    Progress,
    Workload,
    _agreement,
    _check_targets,
    _copy_lora,
    _copy_unipeft,
    _free,
    _gib,
    _input_grad_hook,
    _llama_workload,
    _minilm_workload,
    _peak_bytes,
    _peft_lora,
    _quiet,
    _randomise,
    _state_bytes,
    _sync,
    _trainable,
    _unipeft_lora,
    _wall,
    full_config,
    quick_config,
    require_peft,
    time_interleaved,
)
from .perf_steady import compile_section, steady_section, train_step
from .perf_timing import adamw, optimizer_record

__all__ = [
    "FULL_TARGETS",
    "QUICK_TARGETS",
    "PeftMissingError",
    "PerfConfig",
    "full_config",
    "quick_config",
    "report_sections",
    "require_peft",
    "run_perf",
]

# ============================================================================== sections


def _train_section(
    work: Workload, cfg: PerfConfig, progress: Progress, host: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """Training step and peak memory of every variant, interleaved."""
    dev = cfg.device
    models: dict[str, nn.Module] = {}
    opts: dict[str, torch.optim.Optimizer | None] = {}
    notes: dict[str, str] = {}

    def fresh() -> nn.Module:
        return copy.deepcopy(work.model)

    floor = fresh().train()
    floor.requires_grad_(False)
    floor.get_input_embeddings().register_forward_hook(_input_grad_hook)
    models["floor"], opts["floor"] = floor, None

    full = fresh().train()
    full.requires_grad_(True)
    models["full"] = full

    agree: dict[str, dict[str, float]] = {}
    for tag, targets in (("qv", work.qv), ("all", work.all_linear)):
        um = _unipeft_lora(fresh(), cfg, targets)
        pm = _peft_lora(fresh(), cfg, targets)
        _randomise(um, ADAPTER, cfg.seed)
        _copy_lora(um, ADAPTER, pm, ADAPTER)
        agree[tag] = _agreement(um, pm, work.inputs, base=floor)
        models[f"unipeft_lora_{tag}"], models[f"peft_lora_{tag}"] = um, pm
        if tag == "all":
            pn = _peft_lora(fresh(), cfg, targets, autocast=False)
            _copy_lora(um, ADAPTER, pn, ADAPTER)
            agree["all_native"] = _agreement(um, pn, work.inputs)
            models["peft_native_lora_all"] = pn

    try:
        models["unipeft_dora"] = _unipeft_lora(fresh(), cfg, work.all_linear, method=DORA)
    except Exception as exc:  # the method is optional: report, do not fail
        notes["unipeft_dora"] = f"unipeft DoRA not available: {type(exc).__name__}: {exc}"
    try:
        models["peft_dora"] = _peft_lora(fresh(), cfg, work.all_linear, use_dora=True)
    except Exception as exc:
        notes["peft_dora"] = f"PEFT DoRA failed: {type(exc).__name__}: {exc}"

    steps: dict[str, Callable[[], None]] = {}
    for name, model in models.items():
        model.train()
        if name != "floor":
            params = [p for p in model.parameters() if p.requires_grad]
            opts[name] = adamw(params)
        steps[name] = train_step(model, opts[name], work)

    progress(f"{work.name}: timing {len(steps)} training-step variants")
    ms = time_interleaved(
        steps,
        device=dev,
        warmup=cfg.warmup,
        repeats=cfg.repeats,
        host=host.setdefault(f"{work.name}_train_step", {}),
    )
    peak: dict[str, int | None] = dict.fromkeys(steps)
    if dev == "cuda":
        for name, step in steps.items():
            peak[name] = _peak_bytes(step, _state_bytes(models[name], opts[name]))
    trainable = {name: _trainable(m) for name, m in models.items()}
    del steps, models, opts, floor, full
    _free(dev)
    return _train_figures(work.name, ms, peak, trainable, agree, notes)


def _pair(
    ms: dict[str, float],
    peak: dict[str, int | None],
    u: str,
    p: str,
    ref: str,
    ref_name: str,
) -> dict[str, Any]:
    """The keys of a unipeft-vs-PEFT training figure, ratios from the stored figures."""
    u_ms, p_ms, ref_ms = ms.get(u), ms.get(p), ms[ref]
    u_pk, p_pk, ref_pk = _gib(peak.get(u)), _gib(peak.get(p)), _gib(peak[ref])
    return {
        "unipeft_ms": u_ms,
        "peft_ms": p_ms,
        "unipeft_to_peft": _ratio(u_ms, p_ms),
        f"unipeft_to_{ref_name}": _ratio(u_ms, ref_ms),
        f"peft_to_{ref_name}": _ratio(p_ms, ref_ms),
        "unipeft_peak_gib": u_pk,
        "peft_peak_gib": p_pk,
        f"unipeft_peak_to_{ref_name}": _ratio(u_pk, ref_pk),
        f"peft_peak_to_{ref_name}": _ratio(p_pk, ref_pk),
    }


def _train_figures(
    prefix: str,
    ms: dict[str, float],
    peak: dict[str, int | None],
    trainable: dict[str, int],
    agree: dict[str, dict[str, float]],
    notes: dict[str, str],
) -> dict[str, Any]:
    pre = "" if prefix == "llama" else f"{prefix}_"
    mem_note = (
        {}
        if peak["floor"] is not None
        else {"memory_note": "peak memory is measured on CUDA only; null on the CPU"}
    )
    floor_pk = _gib(peak["floor"])
    figs: dict[str, Any] = {
        f"{pre}train_step_floor": {
            "what": "frozen base: forward + backward to the activations (the embedding output "
            "requires grad), no weight gradient, no optimizer",
            "ms": ms["floor"],
            "peak_gib": floor_pk,
            **mem_note,
        },
        f"{pre}train_step_full": {
            "what": "full fine-tuning: forward + backward + fused AdamW step over every weight",
            "ms": ms["full"],
            "to_floor": _ratio(ms["full"], ms["floor"]),
            "peak_gib": _gib(peak["full"]),
            "peak_to_floor": _ratio(_gib(peak["full"]), floor_pk),
            "trainable": trainable["full"],
            **mem_note,
        },
    }
    for tag, key, what in (
        ("qv", "lora_qv", "LoRA r=16 on q,v"),
        ("all", "lora_all_linear", "LoRA r=16 on every linear layer of the blocks"),
    ):
        fig = {
            "what": f"{what}: forward + backward + fused AdamW step",
            **_pair(ms, peak, f"unipeft_lora_{tag}", f"peft_lora_{tag}", "floor", "floor"),
            "unipeft_trainable": trainable[f"unipeft_lora_{tag}"],
            "peft_trainable": trainable[f"peft_lora_{tag}"],
            "agreement": agree[tag],
            **mem_note,
        }
        if tag == "all":
            native = "peft_native_lora_all"
            fig.update(
                {
                    "peft_native_dtype_ms": ms[native],
                    "unipeft_to_peft_native_dtype": _ratio(ms["unipeft_lora_all"], ms[native]),
                    "peft_native_dtype_to_floor": _ratio(ms[native], ms["floor"]),
                    "peft_native_dtype_peak_gib": _gib(peak[native]),
                    "agreement_native_dtype": agree["all_native"],
                    "peft_note": "peft_*: PEFT's defaults (autocast_adapter_dtype=True keeps "
                    "adapter weights in fp32 on a bf16 model); peft_native_dtype_*: "
                    "autocast_adapter_dtype=False (adapters in the model's dtype)",
                }
            )
        figs[f"{pre}train_step_{key}"] = fig
    dora = {
        "what": "DoRA r=16 on every linear layer: forward + backward + fused AdamW step",
        **_pair(ms, peak, "unipeft_dora", "peft_dora", "floor", "floor"),
        "unipeft_to_unipeft_lora": _ratio(ms.get("unipeft_dora"), ms["unipeft_lora_all"]),
        "peft_to_peft_lora": _ratio(ms.get("peft_dora"), ms["peft_lora_all"]),
        **mem_note,
    }
    if notes:
        dora["note"] = "; ".join(notes.values())
    figs[f"{pre}train_step_dora_all_linear"] = dora
    return figs


def _inference_section(
    work: Workload, cfg: PerfConfig, progress: Progress, host: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """Base, LoRA unmerged and merged (both libraries), and the time a merge takes."""
    dev = cfg.device
    base = copy.deepcopy(work.model).eval()
    u_un = _unipeft_lora(copy.deepcopy(work.model), cfg, work.all_linear).eval()
    p_un = _peft_lora(copy.deepcopy(work.model), cfg, work.all_linear).eval()
    u_m = _unipeft_lora(copy.deepcopy(work.model), cfg, work.all_linear).eval()
    p_m = _peft_lora(copy.deepcopy(work.model), cfg, work.all_linear).eval()
    _randomise(u_un, ADAPTER, cfg.seed)
    _copy_unipeft(u_un, u_m, ADAPTER)
    _copy_lora(u_un, ADAPTER, p_un, ADAPTER)
    _copy_lora(u_un, ADAPTER, p_m, ADAPTER)
    unmerged_agree = _agreement(u_un, p_un, work.inputs, base=base)

    progress(f"{work.name}: timing merges")
    merge_s: dict[str, list[float]] = {"unipeft": [], "peft": []}
    for i in range(cfg.merge_repeats):
        if i:
            u_m.unmerge()
            p_m.unmerge_adapter()
        merge_s["unipeft"].append(_wall(u_m.merge, dev))
        merge_s["peft"].append(_wall(p_m.merge_adapter, dev))
    merged_agree = {
        "unipeft_merged_vs_unmerged": _agreement(u_m, u_un, work.inputs)["max_abs_diff"],
        "peft_merged_vs_unmerged": _agreement(p_m, p_un, work.inputs)["max_abs_diff"],
        "unipeft_merged_vs_peft_merged": _agreement(u_m, p_m, work.inputs)["max_abs_diff"],
    }

    def forward(model: nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return model(**work.inputs)

        return run

    progress(f"{work.name}: timing inference")
    ms = time_interleaved(
        {
            "base": forward(base),
            "unipeft_unmerged": forward(u_un),
            "peft_unmerged": forward(p_un),
            "unipeft_merged": forward(u_m),
            "peft_merged": forward(p_m),
        },
        device=dev,
        warmup=cfg.warmup,
        repeats=cfg.repeats,
        host=host.setdefault(f"{work.name}_inference", {}),
    )
    del base, u_un, p_un, u_m, p_m
    _free(dev)
    figs: dict[str, Any] = {
        "inference_base": {"what": "the plain model, no_grad", "ms": ms["base"]}
    }
    for kind, agree in (("unmerged", unmerged_agree), ("merged", merged_agree)):
        u, p = ms[f"unipeft_{kind}"], ms[f"peft_{kind}"]
        figs[f"inference_{kind}"] = {
            "what": f"LoRA r=16 on every linear layer, {kind}, no_grad",
            "unipeft_ms": u,
            "peft_ms": p,
            "unipeft_to_peft": _ratio(u, p),
            "unipeft_to_base": _ratio(u, ms["base"]),
            "peft_to_base": _ratio(p, ms["base"]),
            "agreement": agree,
        }
    u_merge, p_merge = 1000 * median(merge_s["unipeft"]), 1000 * median(merge_s["peft"])
    figs["merge_time"] = {
        "what": "unipeft merge() vs PEFT merge_adapter(), LoRA on every linear layer "
        "(wall clock, device synchronized)",
        "unipeft_ms": u_merge,
        "peft_ms": p_merge,
        "unipeft_to_peft": _ratio(u_merge, p_merge),
        "repeats": cfg.merge_repeats,
    }
    return figs


def _apply_section(
    work: Workload, cfg: PerfConfig, progress: Progress, host: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """unipeft.apply vs peft.get_peft_model on fresh copies of the big model."""
    dev = cfg.device
    progress(f"{work.name}: timing apply ({cfg.apply_repeats} fresh copies each)")
    appliers: dict[str, Callable[[nn.Module], Any]] = {
        "unipeft": lambda m: _unipeft_lora(m, cfg, work.all_linear),
        "peft": lambda m: _peft_lora(m, cfg, work.all_linear),
    }
    times: dict[str, list[float]] = {lib: [] for lib in appliers}
    for _ in range(cfg.apply_repeats):
        for lib, apply_to in appliers.items():
            fresh = copy.deepcopy(work.model)
            _sync(dev)
            t0 = time.perf_counter()
            wrapped = apply_to(fresh)
            _sync(dev)
            times[lib].append(time.perf_counter() - t0)
            del wrapped, fresh
            _free(dev)
    u, p = median(times["unipeft"]), median(times["peft"])
    return {
        "apply_time": {
            "what": "unipeft.apply vs peft.get_peft_model, LoRA r=16 on every linear layer, "
            "on a fresh copy of the model each time (wall clock, device synchronized)",
            "unipeft_s": u,
            "peft_s": p,
            "unipeft_to_peft": _ratio(u, p),
            "repeats": cfg.apply_repeats,
        }
    }


# ==================================================================================== run


def environment(device: str) -> dict[str, Any]:
    import transformers

    versions: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "unipeft": unipeft.__version__,
    }
    for lib in ("peft", "open_clip"):
        try:
            versions[lib] = __import__(lib).__version__
        except Exception:
            versions[lib] = None
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {
        **versions,
        "device": device,
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "platform": sys.platform,
    }


def _measure(
    cfg: PerfConfig,
    say: Progress,
    figures: dict[str, Any],
    notes: list[str],
    host: dict[str, dict[str, float]],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run the sections of ``cfg`` into ``figures`` (host-side times into ``host``);
    return the descriptions of the models."""
    with _quiet():
        described: dict[str, Any] = {}
        llama_sections = {
            "train": _train_section,
            "steady": steady_section,
            "compile": compile_section,
            "inference": _inference_section,
            "mixed": mixed_section,
            "apply": _apply_section,
            "cuda_graphs": _graph_section,
            "catalogue": catalogue_section,
        }
        if set(llama_sections) & set(cfg.sections):
            say(f"building the Llama ({cfg.profile} configuration, {cfg.device})")
            llama = _llama_workload(cfg)
            for name, section in llama_sections.items():
                if name in cfg.sections:
                    figures.update(section(llama, cfg, say, host))
            described = llama.describe
            del llama
            _free(cfg.device)
        minilm_info: dict[str, Any] | None = None
        if cfg.minilm and "train" in cfg.sections:
            try:
                minilm = _minilm_workload(cfg)
            except Exception as exc:
                notes.append(f"MiniLM figures skipped: {type(exc).__name__}: {exc}")
            else:
                minilm_info = minilm.describe
                figures.update(_train_section(minilm, cfg, say, host))
                del minilm
                _free(cfg.device)
        if "open_clip" in cfg.sections:
            figures.update(_clip_section(cfg, say, host))
    return described, minilm_info


def run_perf(cfg: PerfConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Measure every section of ``cfg``; return the JSON-ready result."""
    require_peft()
    say = progress or (lambda _msg: None)
    figures: dict[str, Any] = {}
    notes: list[str] = []
    host: dict[str, dict[str, float]] = {}
    previous_threads = torch.get_num_threads()
    threads = cfg.threads or (1 if cfg.device == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    torch_threads = torch.get_num_threads()
    if cfg.device == "cpu" and cfg.threads is None:
        notes.append(
            "CPU timings use one intra-op thread: on a CPU shared with other work, several "
            "threads wait on each other and single runs swing by 10x or more"
        )
    try:
        models = _measure(cfg, say, figures, notes, host)
    finally:
        torch.set_num_threads(previous_threads)
    described, minilm_info = models
    config = asdict(cfg)
    config.pop("llama")
    config.update(
        model=described,
        minilm=minilm_info,
        dtype=str(cfg.dtype).removeprefix("torch."),
        sections=list(cfg.sections),
        threads=torch_threads,
        lora={"r": cfg.rank, "alpha": cfg.alpha, "dropout": 0.0, "B": "randomised, N(0, 0.05²)"},
        peft_defaults="PEFT runs with its defaults: autocast_adapter_dtype=True keeps adapter "
        "weights in fp32 on a bf16 model (the all-linear training step is also measured with "
        "autocast_adapter_dtype=False)",
        optimizer=optimizer_record(cfg.device),
        timer="torch.cuda.Event + synchronize" if cfg.device == "cuda" else "time.perf_counter",
        host_ms="on CUDA, per section and variant: median ms until a call returned to Python, "
        "before the synchronize; close to the device time when the host's kernel launches set "
        "the pace or the call waits on the device inside",
        statistic=f"median of {cfg.repeats} interleaved rounds after {cfg.warmup} warm-up "
        + ("round" if cfg.warmup == 1 else "rounds"),
    )
    return {
        "environment": environment(cfg.device),
        "config": config,
        "figures": figures,
        "targets": _check_targets(cfg.profile, figures),
        "notes": notes,
        # on the CPU a call's time is all host time: only CUDA runs report it apart
        "host_ms": host if cfg.device == "cuda" else None,
    }
