"""``unipeft bench perf``'s mixed-batch section: many adapters in one batch, each sample
through its own adapter (``adapter_names=[...]``), against the same model's forward with one
adapter active, for LoRA and DoRA, unipeft and Hugging Face PEFT side by side.

Two batch shapes:

* ``cfg.adapters`` adapters (8) on the section's usual batch (``cfg.batch × cfg.length``,
  8 × 512 on the GPU), sample ``i`` through adapter ``i mod 8``;
* 64 adapters on 64 samples of ``cfg.length // 4`` tokens (64 × 128 on the GPU: one sample
  per adapter, twice the tokens of the first batch), sample ``i`` through adapter ``i``.

Both libraries hold the same factors (``B`` randomised; DoRA's magnitudes moved away from
the weight norms too) and their outputs are compared. unipeft's mixed batch is also timed
with each of its kernels forced (:func:`unipeft.methods.reparameterized.lora.mixed.use_kernel`),
so that the rule of :func:`~unipeft.methods.reparameterized.lora.mixed.choose_kernel` can be
checked against the device. The 64-adapter models are built once per method; the adapters
beyond the first ``cfg.adapters`` are then deleted for the smaller batch.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from unipeft.methods.reparameterized.lora import mixed as lora_mixed

from .perf_setup import (
    DORA,
    PerfConfig,
    Progress,
    Workload,
    _agreement,
    _copy_lora,
    _free,
    _peft_config,
    _peft_layers,
    _peft_lora,
    _primary,
    _randomise,
    _unipeft_lora,
    require_peft,
    time_interleaved,
)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


MANY = 64
QUICK_MANY = 16
FORCED = ("masked", "bgmv", "sgmv")
METHODS = (("lora", "LoRA"), (DORA, "DoRA"))


def figure_name(method: str, many: bool) -> str:
    """``mixed_batch`` (LoRA, 8 adapters: the figure's historical name),
    ``mixed_batch_many`` (LoRA, 64), ``mixed_batch_dora``, ``mixed_batch_dora_many``."""
    name = "mixed_batch" if method == "lora" else f"mixed_batch_{method}"
    return f"{name}_many" if many else name


def mixed_section(
    work: Workload,
    cfg: PerfConfig,
    progress: Progress,
    host: dict[str, dict[str, float]],
    *,
    counts: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Figures for LoRA and DoRA with ``counts`` adapters: ``(cfg.adapters, 64)`` by default,
    ``(cfg.adapters, 16)`` in the quick (CPU) profile, where PEFT's ``add_adapter`` (which
    walks every module of the model, adapters included, each time) would take most of it."""
    small, many = counts or (cfg.adapters, MANY if cfg.profile == "full" else QUICK_MANY)
    many_inputs = _many_inputs(work, cfg, many)
    figures: dict[str, Any] = {}
    for method, label in METHODS:
        t0 = time.perf_counter()
        progress(f"{work.name}: building {many} {label} adapters")
        names = [f"a{i}" for i in range(many)]
        refusal = _peft_refusal(method)
        um, pm, peft_error = _build(work, cfg, method, names, peft_all=refusal is None)
        build_s = time.perf_counter() - t0
        for k, inputs in ((many, many_inputs), (small, work.inputs)):
            if k < many:
                for name in names[k:]:
                    um.delete_adapter(name)
                    if pm is not None and refusal is None:
                        pm.delete_adapter(name)
            batch = next(iter(inputs.values())).shape
            routing = [names[i % k] for i in range(batch[0])]
            progress(f"{work.name}: timing a mixed batch of {k} {label} adapters")
            fig = _measure(cfg, host, um, pm, inputs, routing, refusal, f"{method}_{k}")
            fig.update(
                what=f"{k} {label} adapters (r={cfg.rank}, every linear layer) loaded; sample "
                f"i uses adapter i mod {k} (adapter_names=...), against the same model with "
                "one adapter active; no_grad",
                method=label,
                adapters=k,
                batch=int(batch[0]),
                length=int(batch[1]),
                auto_kernels=_auto_kernels(um, names[0], k, cfg.rank, tuple(batch)),
                build_s=build_s,
            )
            if k < many:  # more samples than adapters: the gathers are not kept then
                fig["more_samples"] = _more_samples(cfg, host, um, many_inputs, names[:k], method)
            if peft_error is not None:
                fig["peft_note"] = peft_error
            figures[figure_name(method, k != small)] = fig
        del um, pm
        _free(cfg.device)
    return figures


def _many_inputs(work: Workload, cfg: PerfConfig, many: int) -> dict[str, torch.Tensor]:
    ids = next(iter(work.inputs.values()))
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    length = max(cfg.length // 4, 8)
    vocab = int(cfg.llama["vocab_size"])
    return {"input_ids": torch.randint(0, vocab, (many, length), generator=gen).to(ids.device)}


def _build(
    work: Workload, cfg: PerfConfig, method: str, names: list[str], peft_all: bool
) -> tuple[Any, Any, str | None]:
    """unipeft and PEFT models holding the adapters ``names`` with the same factors (and
    magnitudes); PEFT's holds only the first unless ``peft_all`` (no mixed batch to time),
    and is ``None`` with the reason when it fails."""
    targets = work.all_linear
    um = _unipeft_lora(copy.deepcopy(work.model), cfg, targets, method=method, name=names[0])
    extra = {"use_dora": True} if method == DORA else {}
    pm: Any = None
    error = None
    try:
        pm = _peft_lora(copy.deepcopy(work.model), cfg, targets, name=names[0], **extra)
    except Exception as exc:  # report, do not fail: the unipeft figures stand alone
        error = f"PEFT failed to build: {type(exc).__name__}: {exc}"
    for i, name in enumerate(names):
        if i:
            um.add_adapter(name, method, r=cfg.rank, alpha=cfg.alpha, targets=targets.unipeft)
            if pm is not None and peft_all:
                pm.add_adapter(name, _peft_config(cfg, targets, **extra))
        _randomise(um, name, cfg.seed + i)
        if method == DORA:
            _move_magnitudes(um, name, cfg.seed + i)
        if pm is not None and (peft_all or i == 0):
            _copy_lora(um, name, pm, name)
            if method == DORA:
                _copy_magnitudes(um, name, pm)
    um.set_active(names[0])
    um.eval()
    if pm is not None:
        pm.set_adapter(names[0])
        pm.eval()
    return um, pm, error


def _move_magnitudes(um: Any, name: str, seed: int) -> None:
    """Scale DoRA's magnitudes by ``1 + N(0, 0.05²)``, so the gains are not the init's."""
    gen = torch.Generator().manual_seed(seed + 10_000)
    with torch.no_grad():
        for att in um.adapters[name].attachments:
            m = att.delta.magnitude
            m.mul_(1 + 0.05 * torch.randn(m.shape, generator=gen).to(m.device, m.dtype))


def _copy_magnitudes(um: Any, name: str, pm: Any) -> None:
    layers = _peft_layers(pm)
    with torch.no_grad():
        for site in um.adapters[name].sites:
            delta = um.adapters[name].delta_at(site)
            layers[site.path].lora_magnitude_vector[name].weight.copy_(delta.magnitude)


def _measure(
    cfg: PerfConfig,
    host: dict[str, dict[str, float]],
    um: Any,
    pm: Any,
    inputs: dict[str, torch.Tensor],
    routing: list[str],
    refusal: str | None,
    tag: str,
) -> dict[str, Any]:
    agree: dict[str, Any] | None = None
    peft_mixed_error = refusal
    per_sample = _per_sample_agreement(um, inputs, routing)
    single_agree = None if pm is None else _agreement(um, pm, inputs)
    if pm is not None and refusal is None:
        try:
            agree = _agreement(um, pm, inputs, adapter_names=routing)
        except Exception as exc:
            # PEFT leaves its adapter_names hooks in place when a forward raises: the
            # model is no longer usable, so PEFT gets no figure here
            peft_mixed_error = f"{type(exc).__name__}: {exc}"
            pm = None

    def forward(model: nn.Module, kernel: str = "auto", **kw: Any) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad(), lora_mixed.use_kernel(kernel):
                return model(**inputs, **kw)

        return run

    ids = next(iter(inputs.values()))
    k = len(set(routing))
    runs = {  # the kernels that apply here (masked: Σr ≤ 512; sgmv: torch._grouped_mm)
        "masked": k * cfg.rank <= 512,
        "bgmv": True,
        "sgmv": lora_mixed.grouped_mm_works(ids.device, cfg.dtype),
    }
    forced = [kernel for kernel in FORCED if runs[kernel]]
    variants = {
        "unipeft_single": forward(um),
        "unipeft_mixed": forward(um, adapter_names=routing),
        **{f"unipeft_{kernel}": forward(um, kernel, adapter_names=routing) for kernel in forced},
    }
    if pm is not None:
        variants["peft_single"] = forward(pm)
        if peft_mixed_error is None:
            variants["peft_mixed"] = forward(pm, adapter_names=routing)
    ms = time_interleaved(
        variants,
        device=cfg.device,
        warmup=cfg.warmup,
        repeats=cfg.repeats,
        host=host.setdefault(f"llama_mixed_batch_{tag}", {}),
    )
    u_single, u_mixed = ms["unipeft_single"], ms["unipeft_mixed"]
    p_single, p_mixed = ms.get("peft_single"), ms.get("peft_mixed")
    fig: dict[str, Any] = {
        "unipeft_single_ms": u_single,
        "unipeft_mixed_ms": u_mixed,
        "unipeft_mixed_to_single": _ratio(u_mixed, u_single),
        "peft_single_ms": p_single,
        "peft_mixed_ms": p_mixed,
        "peft_mixed_to_single": _ratio(p_mixed, p_single),
        "unipeft_to_peft": _ratio(u_mixed, p_mixed),
        "agreement": agree,
        "single_agreement": single_agree,
        "mixed_vs_per_sample": per_sample,
        "unipeft_kernels_ms": {kernel: ms.get(f"unipeft_{kernel}") for kernel in FORCED},
        "unipeft_kernels_to_single": {
            kernel: _ratio(ms.get(f"unipeft_{kernel}"), u_single) for kernel in FORCED
        },
        "kernels_note": "each kernel forced where it applies (null where not: masked needs "
        "Σr ≤ 512, sgmv torch._grouped_mm for the device and dtype)",
    }
    if peft_mixed_error is not None:
        fig["peft_mixed_refused"] = peft_mixed_error
    return fig


def _more_samples(
    cfg: PerfConfig,
    host: dict[str, dict[str, float]],
    um: Any,
    inputs: dict[str, torch.Tensor],
    names: list[str],
    method: str,
) -> dict[str, Any]:
    """unipeft alone: the mixed batch of ``names`` over the larger batch (sample ``i`` through
    adapter ``i mod k``, unsorted for SGMV), by the rule and with each kernel forced, to
    check the rule where BGMV cannot keep its gathered factors."""
    ids = next(iter(inputs.values()))
    routing = [names[i % len(names)] for i in range(ids.shape[0])]
    runs = {
        "masked": len(names) * cfg.rank <= 512,
        "bgmv": True,
        "sgmv": lora_mixed.grouped_mm_works(ids.device, cfg.dtype),
    }

    def forward(kernel: str, **kw: Any) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad(), lora_mixed.use_kernel(kernel):
                return um(**inputs, **kw)

        return run

    variants = {"single": forward("auto"), "auto": forward("auto", adapter_names=routing)}
    for kernel in FORCED:
        if runs[kernel]:
            variants[kernel] = forward(kernel, adapter_names=routing)
    ms = time_interleaved(
        variants,
        device=cfg.device,
        warmup=cfg.warmup,
        repeats=cfg.repeats,
        host=host.setdefault(f"llama_mixed_batch_{method}_{len(names)}_more_samples", {}),
    )
    return {
        "batch": int(ids.shape[0]),
        "length": int(ids.shape[1]),
        "unipeft_single_ms": ms["single"],
        "unipeft_kernels_ms": {kernel: ms.get(kernel) for kernel in ("auto", *FORCED)},
        "unipeft_kernels_to_single": {
            kernel: _ratio(ms.get(kernel), ms["single"]) for kernel in ("auto", *FORCED)
        },
        "auto_kernels": _auto_kernels(um, names[0], len(names), cfg.rank, tuple(ids.shape)),
    }


@torch.no_grad()
def _per_sample_agreement(um: Any, inputs: dict[str, torch.Tensor], routing: list[str]) -> float:
    """Largest difference between unipeft's mixed batch and each sample run alone with its
    adapter active (what the mixed batch must equal)."""
    active = um.active_adapters
    mixed = _primary(um(**inputs, adapter_names=routing))
    worst = 0.0
    try:
        for i, name in enumerate(routing):
            um.set_active(name)
            one = _primary(um(**{k: v[i : i + 1] for k, v in inputs.items()}))
            worst = max(worst, (one.float() - mixed[i : i + 1].float()).abs().max().item())
    finally:
        um.set_active(active)
    return worst


def _peft_refusal(method: str) -> str | None:
    """PEFT's error for a mixed batch of ``method``'s adapters (PEFT 0.21 refuses DoRA),
    found on a tiny model: a refused forward leaves PEFT's hooks behind in the model it ran
    on. ``None`` when PEFT runs it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if method != DORA:
        return None
    peft = require_peft()
    tiny = LlamaConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, vocab_size=32,
    )  # fmt: skip
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    model = peft.get_peft_model(LlamaForCausalLM(tiny), config).eval()
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long), adapter_names=["default"])
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _auto_kernels(um: Any, adapter: str, k: int, rank: int, shape: tuple) -> dict[str, str]:
    """What the dispatch rule picks at each projection shape (``in x out``) of the model
    for ``k`` adapters of rank ``rank`` and a batch of ``shape``, without gradients."""
    out: dict[str, str] = {}
    for att in um.adapters[adapter].attachments:
        delta = att.delta
        d_in, d_out = delta.shape.in_features, delta.shape.out_features
        out[f"{d_in}x{d_out}"] = lora_mixed.choose_kernel(
            k * rank, rank, shape[0], k, shape[1], d_in, d_out, delta.A.device
        )
    return out


# ================================================================================ report


def mixed_report_rows(
    figs: dict[str, Any], targets: dict[tuple[str, str], dict[str, Any]]
) -> list[tuple[str, list[dict[str, str]]]]:
    """The report's tables for this section, one per method: ``(title, rows)``, each row the
    fields of :class:`~.perf_report.Row` as formatted cells (the section's reference:
    ``single``). ``targets``: the result's targets by ``(figure, quantity)``, as
    :func:`~.perf_report.report_sections` keys them. Plain data, so that the report can
    call this without an import cycle."""
    tables = []
    for _, label in METHODS:
        names = sorted(
            (
                n
                for n, f in figs.items()
                if n.startswith("mixed_batch") and f.get("method") == label
            ),
            key=lambda n: figs[n]["adapters"],
        )
        rows = [row for name in names for row in _rows(name, figs[name], targets)]
        if rows:
            tables.append((f"mixed batch, {label}, Llama", rows))
    return tables


def _ms(v: float | None) -> str:  # the report's formats (perf_report imports this module)
    return "—" if v is None else f"{v:.2f} ms" if v < 100 else f"{v:.0f} ms"


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _rows(
    name: str, f: dict[str, Any], targets: dict[tuple[str, str], dict[str, Any]]
) -> list[dict[str, str]]:
    shape = f"{f['adapters']} adapters, {f['batch']} × {f['length']}"
    mixed = {
        "figure": f"  sample i → adapter i mod {f['adapters']}",
        "unipeft": _ms(f["unipeft_mixed_ms"]),
        "peft": _ms(f["peft_mixed_ms"]) if f["peft_mixed_ms"] is not None else "refused",
        "ratio": _x(f["unipeft_to_peft"]),
        "to_ref": f"{_x(f['unipeft_mixed_to_single'])} / {_x(f['peft_mixed_to_single'])}",
    }
    t = targets.get((name, "unipeft_mixed_to_single"))
    if t is not None:
        mixed["target"] = f"≤ {t['limit']:g}× single"
        mixed["met"] = "n/a" if t["met"] is None else "met" if t["met"] else "missed"
    single = {
        "figure": f"{shape}: one adapter active",
        "unipeft": _ms(f["unipeft_single_ms"]),
        "peft": _ms(f["peft_single_ms"]),
        "ratio": _x(_ratio(f["unipeft_single_ms"], f["peft_single_ms"])),
        "to_ref": "1.00× / 1.00×",
    }
    rows = [single, mixed]
    for kernel, v in f["unipeft_kernels_ms"].items():
        ratio = _x(f["unipeft_kernels_to_single"][kernel])
        rows.append({"figure": f"    kernel {kernel} (forced)", "unipeft": _ms(v), "to_ref": ratio})
    if f["agreement"] is not None:
        diff = f"{f['agreement']['max_abs_diff']:.1e}"
        rows.append({"figure": "  max |Δ output| unipeft vs PEFT", "unipeft": diff})
    elif f["single_agreement"] is not None:  # PEFT refused the mixed batch
        diff = f"{f['single_agreement']['max_abs_diff']:.1e}"
        rows.append({"figure": "  max |Δ output| unipeft vs PEFT, one active", "unipeft": diff})
    diff = f"{f['mixed_vs_per_sample']:.1e}"
    rows.append({"figure": "  max |Δ output| mixed vs each sample alone", "unipeft": diff})
    more = f.get("more_samples")
    if more is not None:
        rows.append(
            {
                "figure": f"  {more['batch']} × {more['length']} over {f['adapters']} adapters: "
                "one active",
                "unipeft": _ms(more["unipeft_single_ms"]),
                "to_ref": "1.00×",
            }
        )
        for kernel, v in more["unipeft_kernels_ms"].items():
            label = "by the rule" if kernel == "auto" else f"kernel {kernel} (forced)"
            ratio = _x(more["unipeft_kernels_to_single"][kernel])
            rows.append({"figure": f"    {label}", "unipeft": _ms(v), "to_ref": ratio})
    return rows
