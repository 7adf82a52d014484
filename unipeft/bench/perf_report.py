"""The human-readable tables of a ``unipeft bench perf`` result (:func:`report_sections`):
one :class:`Section` per part of the run, each a list of formatted :class:`Row`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .perf_mixed import mixed_report_rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f} ms" if v < 100 else f"{v:.0f} ms"


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def _gb(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f} GiB"


def _both(a: float | None, b: float | None) -> str:
    return "—" if a is None and b is None else f"{_x(a)} / {_x(b)}"


@dataclass
class Row:
    """One line of a report table; every cell already formatted."""

    figure: str
    unipeft: str = "—"
    peft: str = "—"
    ratio: str = "—"  # unipeft / peft
    to_ref: str = "—"  # each library's figure / the section's reference: "unipeft / peft"
    target: str = ""
    met: str = ""


@dataclass
class Section:
    title: str
    ref: str  # what the to_ref column divides by: floor, base, single ("" for none)
    rows: list[Row]


_TARGET_UNITS = {
    "unipeft_to_floor": "× floor",
    "unipeft_peak_to_floor": "× floor",
    "unipeft_to_peft": "× peft",
    "unipeft_to_base": "× base",
    "unipeft_mixed_to_single": "× single",
    "unipeft_to_unipeft_lora": "× LoRA",
    "unipeft_s": " s",
}


def report_sections(result: dict[str, Any]) -> list[Section]:
    """The human-readable tables of a result from :func:`run_perf`."""
    figs = result["figures"]
    targets = {(t["figure"], t["quantity"]): t for t in result["targets"]}

    def row(figure: str, *quantities: str, **cells: str) -> Row:
        out = Row(figure=cells.pop("label"), **cells)
        limits, marks = [], []  # a row may carry several targets: "; " between them
        for q in quantities:
            t = targets.get((figure, q))
            if t is not None:
                limits.append(f"≤ {t['limit']:g}{_TARGET_UNITS.get(q, '')}")
                marks.append("n/a" if t["met"] is None else "met" if t["met"] else "missed")
        if limits:
            out.target, out.met = "; ".join(limits), "; ".join(marks)
        return out

    def pair(name: str, label: str, ref: str, *quantities: str) -> Row:
        f = figs[name]
        return row(
            name,
            *quantities,
            label=label,
            unipeft=_ms(f["unipeft_ms"]),
            peft=_ms(f["peft_ms"]),
            ratio=_x(f["unipeft_to_peft"]),
            to_ref=_both(f[f"unipeft_to_{ref}"], f[f"peft_to_{ref}"]),
        )

    def agreement(diff: float) -> Row:
        return Row("  max |Δ output|", f"{diff:.1e}")

    sections: list[Section] = []
    for pre, model in (("", "Llama"), ("minilm_", "MiniLM")):
        floor = figs.get(f"{pre}train_step_floor")
        if floor is None:
            continue
        memory = floor["peak_gib"] is not None
        full = figs[f"{pre}train_step_full"]
        rows = [
            Row("frozen-base floor", _ms(floor["ms"]), to_ref="1.00×"),
            Row("full fine-tuning", _ms(full["ms"]), to_ref=_x(full["to_floor"])),
        ]
        if memory:
            rows[1:1] = [Row("  peak memory", _gb(floor["peak_gib"]), to_ref="1.00×")]
            rows.append(
                Row("  peak memory", _gb(full["peak_gib"]), to_ref=_x(full["peak_to_floor"]))
            )
        for key, label in (("lora_qv", "LoRA q,v"), ("lora_all_linear", "LoRA all linear")):
            name = f"{pre}train_step_{key}"
            f = figs[name]
            rows.append(pair(name, label, "floor", "unipeft_to_floor", "unipeft_to_peft"))
            if memory:
                rows.append(
                    row(
                        name,
                        "unipeft_peak_to_floor",
                        label="  peak memory",
                        unipeft=_gb(f["unipeft_peak_gib"]),
                        peft=_gb(f["peft_peak_gib"]),
                        ratio=_x(_ratio(f["unipeft_peak_gib"], f["peft_peak_gib"])),
                        to_ref=_both(f["unipeft_peak_to_floor"], f["peft_peak_to_floor"]),
                    )
                )
            if "peft_native_dtype_ms" in f:
                rows.append(
                    Row(
                        "  peft, autocast off",
                        _ms(f["unipeft_ms"]),
                        _ms(f["peft_native_dtype_ms"]),
                        _x(f["unipeft_to_peft_native_dtype"]),
                        _both(f["unipeft_to_floor"], f["peft_native_dtype_to_floor"]),
                    )
                )
            rows.append(agreement(f["agreement"]["max_abs_diff"]))
        name = f"{pre}train_step_dora_all_linear"
        d = figs[name]
        rows.append(pair(name, "DoRA all linear", "floor"))
        rows.append(
            row(
                name,
                "unipeft_to_unipeft_lora",
                label="  DoRA step / own LoRA step",
                unipeft=_x(d["unipeft_to_unipeft_lora"]),
                peft=_x(d["peft_to_peft_lora"]),
            )
        )
        sections.append(Section(f"training step, {model}", "floor", rows))

    sections += _steady_sections(figs)
    if "inference_base" in figs:
        m = figs["merge_time"]
        rows = [
            Row("base", _ms(figs["inference_base"]["ms"]), to_ref="1.00×"),
            pair("inference_unmerged", "LoRA all linear, unmerged", "base", "unipeft_to_base"),
            pair("inference_merged", "LoRA all linear, merged", "base", "unipeft_to_base"),
            Row("time to merge", _ms(m["unipeft_ms"]), _ms(m["peft_ms"]), _x(m["unipeft_to_peft"])),
            agreement(figs["inference_unmerged"]["agreement"]["max_abs_diff"]),
        ]
        sections.append(Section("inference, Llama", "base", rows))

    for title, mixed_rows in mixed_report_rows(figs, targets):
        sections.append(Section(title, "single", [Row(**r) for r in mixed_rows]))

    if "open_clip_mha_lora" in figs:
        f = figs["open_clip_mha_lora"]
        rows = [
            Row("base image tower", _ms(f["base_ms"]), to_ref="1.00×"),
            row(
                "open_clip_mha_lora",
                "unipeft_to_base",
                label="LoRA on attention q,k,v,out",
                unipeft=_ms(f["unipeft_ms"]),
                peft=_ms(f["peft_ms"]) if f["peft_ms"] is not None else "failed (see note)",
                ratio=_x(f["unipeft_to_peft"]),
                to_ref=_both(f["unipeft_to_base"], f["peft_to_base"]),
            ),
        ]
        sections.append(Section(f"open_clip, {f['model']}, batch {f['batch']}", "base", rows))

    if "train_step_cuda_graph" in figs:
        f, g = figs["train_step_cuda_graph"], figs["inference_unmerged_cuda_graph"]
        rows = [
            Row("training step: frozen-base floor", _ms(f["floor_ms"]), to_ref="1.00×"),
            Row(
                "  LoRA all linear",
                _ms(f["unipeft_ms"]),
                _ms(f["peft_ms"]),
                _x(f["unipeft_to_peft"]),
                _both(f["unipeft_to_floor"], f["peft_to_floor"]),
            ),
            Row(
                "  DoRA all linear (÷ own LoRA)",
                _ms(f["unipeft_dora_ms"]),
                to_ref=_x(f["unipeft_dora_to_unipeft_lora"]),
            ),
            Row("inference: base", _ms(g["base_ms"]), to_ref="1.00×"),
            Row(
                "  LoRA all linear, unmerged",
                _ms(g["unipeft_ms"]),
                _ms(g["peft_ms"]),
                _x(g["unipeft_to_peft"]),
                _both(g["unipeft_to_base"], g["peft_to_base"]),
            ),
        ]
        sections.append(Section("CUDA graphs (device time), Llama", "floor / base", rows))

    if "train_step_catalogue" in figs:
        rows = []
        for method, f in figs["train_step_catalogue"]["methods"].items():
            if "note" in f:
                rows.append(Row(method, "failed", to_ref=f["note"][:60]))
                continue
            rows.append(
                Row(method, _ms(f["unipeft_ms"]), _ms(f["peft_ms"]), _x(f["unipeft_to_peft"]))
            )
            if f["unipeft_peak_gib"] is not None:
                rows.append(
                    Row(
                        "  peak memory",
                        _gb(f["unipeft_peak_gib"]),
                        _gb(f["peft_peak_gib"]),
                        _x(f["peak_unipeft_to_peft"]),
                    )
                )
            rows.append(
                Row(
                    "  max |Δ output| (adapter's effect)",
                    f"{f['max_abs_diff']:.1e}",
                    f"({f['adapter_effect']:.1e})",
                )
            )
        sections.append(Section("catalogue training step, Llama, all linear", "", rows))

    if "apply_time" in figs:
        f = figs["apply_time"]
        rows = [
            row(
                "apply_time",
                "unipeft_s",
                label="apply LoRA all linear",
                unipeft=f"{f['unipeft_s']:.3f} s",
                peft=f"{f['peft_s']:.3f} s",
                ratio=_x(f["unipeft_to_peft"]),
            )
        ]
        sections.append(Section("apply, Llama", "", rows))
    return sections


def _lib_row(label: str, f: dict[str, Any]) -> Row:
    """A unipeft-vs-PEFT row of the steady-state and compiled figures."""
    return Row(
        label,
        _ms(f["unipeft_ms"]),
        _ms(f["peft_ms"]),
        _x(f["unipeft_to_peft"]),
        _both(f["unipeft_to_floor"], f["peft_to_floor"]),
    )


def _breaks(variant: dict[str, Any] | None) -> str:
    return "—" if variant is None else str(variant["graph_breaks"])


def _steady_sections(figs: dict[str, Any]) -> list[Section]:
    """The one-variant-at-a-time tables: eager steady state, and under torch.compile."""
    out = []
    if "train_step_steady" in figs:
        f = figs["train_step_steady"]
        rows = [
            Row("frozen-base floor", _ms(f["floor_ms"]), to_ref="1.00×"),
            Row("full fine-tuning", _ms(f["full_ms"]), to_ref=_x(f["full_to_floor"])),
            _lib_row("LoRA q,v", f["lora_qv"]),
            _lib_row("LoRA all linear", f["lora_all_linear"]),
        ]
        lora = f["lora_all_linear"]
        if "peft_native_dtype_ms" in lora:
            rows.append(
                Row(
                    "  peft, autocast off",
                    _ms(lora["unipeft_ms"]),
                    _ms(lora["peft_native_dtype_ms"]),
                    _x(_ratio(lora["unipeft_ms"], lora["peft_native_dtype_ms"])),
                    _both(lora["unipeft_to_floor"], lora["peft_native_dtype_to_floor"]),
                )
            )
        rows.append(_lib_row("DoRA all linear", f["dora"]))
        rows += [Row(f"  {name} failed", to_ref=note[:60]) for name, note in f["notes"].items()]
        title = f"training step, steady state (each variant alone, {f['steps']} steps), Llama"
        out.append(Section(title, "floor", rows))
    if "train_step_compiled" in figs:
        f = figs["train_step_compiled"]
        v = f["variants"]
        rows = [Row("frozen-base floor", _ms(f["floor_ms"]), to_ref="1.00×")]
        for label, key, u, p in (
            ("LoRA all linear", "lora_all_linear", "unipeft_lora_all", "peft_lora_all"),
            ("DoRA all linear", "dora", "unipeft_dora", "peft_dora"),
        ):
            if u not in v and p not in v:
                continue
            rows.append(_lib_row(label, f[key]))
            rows.append(Row("  graph breaks", _breaks(v.get(u)), _breaks(v.get(p))))
        rows.insert(1, Row("  graph breaks", _breaks(v.get("floor"))))
        rows += [
            Row(f"  {name} failed", to_ref=(entry["error"] or "")[:60])
            for name, entry in v.items()
            if entry["error"]
        ]
        title = f"training step, torch.compile ({f['backend']}), each variant alone, Llama"
        out.append(Section(title, "compiled floor", rows))
    return out
