"""The steady-state and compiled sections of ``unipeft bench perf``: each variant alone, as a
training loop runs it.

``steady``: one variant at a time is built, stepped ``cfg.steady_warmup`` times untimed and
then ``cfg.steady_steps`` times back to back (:func:`.perf_timing.time_steady`), and freed
before the next is built. ``compile``: the same with the whole model under
``torch.compile`` (the optimizer step stays eager, as in Hugging Face's ``Trainer``); each
variant's graph breaks are counted, and a variant that fails to compile is recorded with
its error.
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
    _frozen_floor,
    _peft_lora,
    _randomised,
    _unipeft_lora,
)
from .perf_timing import adamw, release, time_steady

Builder = Callable[[], nn.Module]


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer | None, work: Workload
) -> Callable[[], None]:
    """Forward, backward and (when there is one) the optimizer step of ``model``."""

    def step() -> None:
        loss = work.loss(model(**work.train_inputs))
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def _optimizer(model: nn.Module) -> torch.optim.Optimizer | None:
    params = [p for p in model.parameters() if p.requires_grad]
    return adamw(params) if params else None


def _builders(work: Workload, cfg: PerfConfig, floor: Builder) -> dict[str, Builder]:
    """Every variant of the training step, built on a fresh copy of the model when called."""

    def fresh() -> nn.Module:
        return copy.deepcopy(work.model).train()

    def full() -> nn.Module:
        return fresh().requires_grad_(True)

    def unipeft(targets: Any, method: str = "lora") -> Builder:
        if method == "lora":  # B random, as in the other sections (it starts at zero)
            return lambda: _randomised(_unipeft_lora(fresh(), cfg, targets), cfg)
        return lambda: _unipeft_lora(fresh(), cfg, targets, method=method)

    def peft(targets: Any, **kw: Any) -> Builder:
        return lambda: _peft_lora(fresh(), cfg, targets, **kw)

    return {
        "floor": floor,
        "full": full,
        "unipeft_lora_qv": unipeft(work.qv),
        "peft_lora_qv": peft(work.qv),
        "unipeft_lora_all": unipeft(work.all_linear),
        "peft_lora_all": peft(work.all_linear),
        "peft_native_lora_all": peft(work.all_linear, autocast=False),
        "unipeft_dora": unipeft(work.all_linear, DORA),
        "peft_dora": peft(work.all_linear, use_dora=True),
    }


def _pairs(ms: dict[str, float | None], floor: float | None) -> dict[str, Any]:
    """unipeft-vs-PEFT entries (``ms``, ratio to ``floor``) of each adapter variant."""
    out: dict[str, Any] = {}
    for key, tag in (("lora_qv", "lora_qv"), ("lora_all_linear", "lora_all"), ("dora", "dora")):
        u, p = ms.get(f"unipeft_{tag}"), ms.get(f"peft_{tag}")
        entry = {
            "unipeft_ms": u,
            "peft_ms": p,
            "unipeft_to_floor": _ratio(u, floor),
            "peft_to_floor": _ratio(p, floor),
            "unipeft_to_peft": _ratio(u, p),
        }
        native = ms.get(f"peft_native_{tag}")
        if native is not None:
            entry["peft_native_dtype_ms"] = native
            entry["peft_native_dtype_to_floor"] = _ratio(native, floor)
        out[key] = entry
    for lib in ("unipeft", "peft"):  # DoRA's step against the same library's LoRA step
        out["dora"][f"{lib}_to_own_lora"] = _ratio(ms.get(f"{lib}_dora"), ms.get(f"{lib}_lora_all"))
    return out


# =============================================================================== steady


def steady_section(
    work: Workload, cfg: PerfConfig, progress: Progress, host: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """The training step of each variant alone: warm-up steps, then consecutive steps."""
    del host  # one variant at a time: the host's share is inside the step times
    builders = _builders(work, cfg, lambda: _frozen_floor(copy.deepcopy(work.model).train()))
    progress(
        f"{work.name}: timing {len(builders)} variants one at a time "
        f"({cfg.steady_warmup} warm-up + {cfg.steady_steps} steps each)"
    )
    timed: dict[str, dict[str, float]] = {}
    notes: dict[str, str] = {}
    for name, build in builders.items():
        try:
            model = build()
            step = train_step(model, _optimizer(model), work)
            timed[name] = time_steady(
                step, device=cfg.device, warmup=cfg.steady_warmup, steps=cfg.steady_steps
            )
        except Exception as exc:  # a variant a library lacks is a note, not a failure
            notes[name] = f"{type(exc).__name__}: {exc}"
        step = model = None  # type: ignore[assignment]
        release(cfg.device)
    ms = {name: t["median_ms"] for name, t in timed.items()}
    floor = ms.get("floor")
    return {
        "train_step_steady": {
            "what": "training step (forward, backward, fused AdamW step) of each variant "
            "alone: built, stepped warm-up times, then stepped back to back; the model is "
            "freed before the next variant is built",
            "statistic": f"median ms per step of {cfg.steady_steps} consecutive steps after "
            f"{cfg.steady_warmup} warm-up steps (mean_ms: their mean)",
            "warmup": cfg.steady_warmup,
            "steps": cfg.steady_steps,
            "floor_ms": floor,
            "full_ms": ms.get("full"),
            "full_to_floor": _ratio(ms.get("full"), floor),
            **_pairs(ms, floor),
            "mean_ms": {name: t["mean_ms"] for name, t in timed.items()},
            "notes": notes,
        }
    }


# ============================================================================== compile


def _scalar_floor(model: nn.Module) -> nn.Module:
    """The frozen base for ``torch.compile``: every weight frozen and a trainable zero scalar
    added to the embedding output, so backward runs through every layer and computes no
    weight gradient but that scalar's (one reduction). The eager floor's
    ``detach().requires_grad_()`` would break the compiled graph at the embedding."""
    model.requires_grad_(False)
    like = next(model.parameters())
    zero = nn.Parameter(torch.zeros((), device=like.device, dtype=like.dtype))
    model.register_parameter("_floor_zero", zero)
    model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out + zero)
    return model


def _compile(model: nn.Module, cfg: PerfConfig) -> nn.Module:
    """The whole model under one ``torch.compile``, or (scope ``blocks``) each block of its
    first stack of two or more, compiled in place: identical blocks share one compiled
    graph, so that compiles in a fraction of the time; the rest stays eager."""
    if cfg.compile_scope == "model":
        return torch.compile(model, backend=cfg.compile_backend)
    stack = next(m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1)
    for block in stack:
        block.compile(backend=cfg.compile_backend)
    return model


COMPILED = ("floor", "unipeft_lora_all", "peft_lora_all", "unipeft_dora", "peft_dora")


def _short(reason: str) -> str:
    """A graph-break reason in one line: its title and, when given, its explanation."""
    lines = [ln.strip() for ln in str(reason).strip().splitlines() if ln.strip()]
    why = next((ln for ln in lines[1:] if ln.startswith("Explanation:")), "")
    return f"{lines[0]} ({why.removeprefix('Explanation: ')})"[:300] if why else lines[0][:300]


def _where(filename: str, lineno: int | None, name: str) -> str:
    for root in ("site-packages/", "unipeft/"):
        if root in filename:
            cut = filename.index(root) + (len(root) if root == "site-packages/" else 0)
            filename = filename[cut:]
            break
    return f"{filename}:{lineno} ({name})"


def _breaks() -> dict[str, Any]:
    """Graph breaks and their reasons since the counters were cleared, and the graphs."""
    from torch._dynamo.utils import counters

    reasons: dict[str, int] = {}
    for reason, n in counters["graph_break"].items():
        reasons[_short(reason)] = reasons.get(_short(reason), 0) + n
    return {
        "graph_breaks": sum(reasons.values()),
        "break_reasons": reasons,
        "unique_graphs": counters["stats"].get("unique_graphs", 0),
    }


def _break_sites(model: nn.Module, work: Workload, most: int = 20) -> dict[str, int]:
    """Where the forward breaks the graph (``torch._dynamo.explain``: the innermost frame
    of each break, ``file:line (function)``, with the reason), most frequent first."""
    import torch._dynamo

    explained = torch._dynamo.explain(model)(**work.train_inputs)
    sites: dict[str, int] = {}
    for brk in explained.break_reasons:
        frame = brk.user_stack[-1] if brk.user_stack else None
        where = _where(frame.filename, frame.lineno, frame.name) if frame else "?"
        key = f"{where}: {_short(brk.reason)}"
        sites[key] = sites.get(key, 0) + 1
    return dict(sorted(sites.items(), key=lambda kv: -kv[1])[:most])


def compile_section(
    work: Workload, cfg: PerfConfig, progress: Progress, host: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """Floor, LoRA on every linear layer (both libraries) and DoRA (both) with the whole
    model under ``torch.compile``, timed one at a time as :func:`steady_section` does."""
    del host
    import torch._dynamo
    from torch._dynamo.utils import counters

    builders = _builders(work, cfg, lambda: _scalar_floor(copy.deepcopy(work.model).train()))
    variants: dict[str, dict[str, Any]] = {}
    for name in COMPILED:
        progress(f"{work.name}: compiling and timing {name} ({cfg.compile_backend})")
        torch._dynamo.reset()
        counters.clear()
        entry: dict[str, Any] = {"error": None}
        try:
            model = builders[name]()
            compiled = _compile(model, cfg)
            step = train_step(compiled, _optimizer(model), work)
            t = time_steady(
                step, device=cfg.device, warmup=max(cfg.steady_warmup, 2), steps=cfg.steady_steps
            )
            entry.update(ms=t["median_ms"], mean_ms=t["mean_ms"])
            entry["first_step_s"] = None if t["first_call_ms"] is None else t["first_call_ms"] / 1e3
        except Exception as exc:  # a variant that does not compile is a figure too
            entry.update(ms=None, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
        entry.update(_breaks())
        if entry["graph_breaks"] and entry["error"] is None:
            try:  # a second trace of the forward, only for a variant that breaks
                entry["break_sites"] = _break_sites(model, work)
            except Exception as exc:
                entry["break_sites"] = {f"explain failed: {type(exc).__name__}: {exc}": 0}
        variants[name] = entry
        progress(
            f"  {name}: "
            + (
                f"failed ({entry['error'][:80]})"
                if entry["error"]
                else f"{entry['ms']:.2f} ms/step, first step {entry['first_step_s']:.1f} s, "
                f"{entry['graph_breaks']} graph breaks"
            )
        )
        step = compiled = model = None  # type: ignore[assignment]
        torch._dynamo.reset()
        release(cfg.device)
    ms = {name: v["ms"] for name, v in variants.items()}
    floor = ms["floor"]
    for v in variants.values():
        v["to_floor"] = _ratio(v["ms"], floor)
    pairs = _pairs(ms, floor)
    return {
        "train_step_compiled": {
            "what": "training step under torch.compile (scope model: the whole model; "
            "blocks: each decoder block) with the fused AdamW step eager, each variant alone; "
            "ratios to the compiled floor (frozen base, a trainable zero scalar added to the "
            "embedding output)",
            "backend": cfg.compile_backend,
            "scope": cfg.compile_scope,
            "statistic": f"median ms per step of {cfg.steady_steps} consecutive steps after "
            f"{max(cfg.steady_warmup, 2)} warm-up steps (the first compiles: first_step_s)",
            "floor_ms": floor,
            "lora_all_linear": pairs["lora_all_linear"],
            "dora": pairs["dora"],
            "variants": variants,
        }
    }
