"""Exact merging: fold deltas into base weights and take them out again bit for bit.

Unmerging by subtraction drifts (``(W + Δ) - Δ != W`` in floating point, badly so in
bf16). Instead the ledger keeps a pristine copy of every base tensor it touches while any
delta is merged into it, and rebuilds the tensor from that copy whenever the set of merged
deltas changes. When the last delta leaves, the copy is written back and dropped, so the
weights are the original bits after any number of merge/unmerge cycles.

The same copies hold **residuals**: a delta that defines ``residual(weight, bias)`` (LoRA
initialised with PiSSA or OLoRA: ``W - s·B₀A₀``) keeps that part of its function in the
weights while it runs alone on them (:meth:`MergeLedger.hold_residuals`; its
``residual_in_base`` attribute says whether it is there now). A rebuild applies the
residuals first, then the merged deltas, so taking either out is exact too.

A **quantized** weight (a :class:`~unipeft.contract.sites.WeightCodec` claims it:
bitsandbytes 4-bit or 8-bit, torchao) cannot hold ``W + ΔW`` exactly. Its record keeps the
codec's snapshot of the layer (the original quantized parameter object, untouched, and the
state the layer keeps beside it); a rebuild restores that snapshot, dequantizes, folds the
deltas into the full-precision copy, and re-quantizes it in the layer's own format. The
largest ``|W_merged - (W + ΔW)|`` is recorded (:meth:`MergeLedger.quantization_errors`) and
stated in a :class:`~unipeft.quantization.QuantizedMergeWarning`. Taking the last delta out
restores the snapshot: the original bytes, exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..contract.sites import ModuleSite, WeightCodec, weight_codec
from ..distributed import zero
from ..quantization import record_error, warn_merge
from .state import AdapterState, Attachment


@dataclass(eq=False)
class _Record:
    module: nn.Module
    weight_name: str
    bias_name: str
    pristine_weight: Tensor
    pristine_bias: Tensor | None
    merged: list[Attachment] = field(default_factory=list)
    residual: list[Attachment] = field(default_factory=list)
    created_bias: bool = False
    codec: WeightCodec | None = None  # a quantized weight: pristine_weight is unused
    snapshot: Any = None
    path: str = ""
    error: float | None = None  # max |W_merged - (W + ΔW)| of the last re-quantization


def _names(site: ModuleSite) -> tuple[str, str]:
    if site.weight is not None:
        return site.weight.weight_name, site.weight.bias_name
    return "weight", "bias"


class MergeLedger:
    """Pristine copies of the base tensors that hold merged deltas."""

    def __init__(self) -> None:
        self._records: dict[tuple[int, str], _Record] = {}

    def merged(self) -> list[Attachment]:
        return [a for r in self._records.values() for a in r.merged]

    def merge(self, attachments: Iterable[Attachment]) -> None:
        attachments = list(attachments)
        touched: dict[int, _Record] = {}
        # under DeepSpeed ZeRO-3 the weights and deltas are whole on every rank meanwhile, and
        # what rank 0 writes is partitioned back (every rank computes the same); else a no-op
        with zero.gathered(zero.merge_parameters(attachments), modifier_rank=0):
            for att in attachments:
                site = att.site
                assert isinstance(site, ModuleSite)
                rec = self._record(site)
                rec.merged.append(att)
                att.merged = True
                touched[id(rec)] = rec
            for rec in touched.values():
                self._rebuild(rec)
        warn_merge({r.path: r.error for r in touched.values() if r.error is not None})

    def quantization_errors(self) -> dict[str, float]:
        """``max |W_merged - (W + ΔW)|`` per quantized layer holding deltas now, by path."""
        return {r.path: r.error for r in self._records.values() if r.error is not None}

    def unmerge(self, attachments: Iterable[Attachment]) -> None:
        attachments = list(attachments)
        touched: dict[int, _Record] = {}
        for att in attachments:
            for rec in self._records.values():
                if att in rec.merged:
                    rec.merged.remove(att)
                    touched[id(rec)] = rec
            att.merged = False
        others = [a for r in touched.values() for a in (*r.merged, *r.residual)]
        with zero.gathered(zero.merge_parameters([*attachments, *others]), modifier_rank=0):
            for rec in touched.values():
                self._rebuild(rec)

    def residuals(self) -> list[Attachment]:
        return [a for r in self._records.values() for a in r.residual]

    def hold_residuals(self, attachments: Iterable[Attachment]) -> None:
        """Make the residuals of exactly ``attachments`` live in the weights (others out)."""
        wanted = {id(a): a for a in attachments}
        touched: dict[int, _Record] = {}
        for rec in list(self._records.values()):
            keep = [a for a in rec.residual if id(a) in wanted]
            if len(keep) != len(rec.residual):
                for a in rec.residual:
                    if id(a) not in wanted:
                        a.delta.residual_in_base = False  # type: ignore[attr-defined]
                rec.residual = keep
                touched[id(rec)] = rec
        for att in wanted.values():
            site = att.site
            assert isinstance(site, ModuleSite)
            rec = self._record(site)
            if att not in rec.residual:
                rec.residual.append(att)
                touched[id(rec)] = rec
            att.delta.residual_in_base = True  # type: ignore[attr-defined]
        for rec in touched.values():
            self._rebuild(rec)

    def _record(self, site: ModuleSite) -> _Record:
        wname, bname = _names(site)
        key = (id(site.module), wname)
        rec = self._records.get(key)
        if rec is None:
            w = getattr(site.module, wname)
            b = getattr(site.module, bname, None)
            codec = weight_codec(w, site.module)
            rec = self._records[key] = _Record(
                site.module,
                wname,
                bname,
                w.detach().clone() if codec is None else w,
                None if b is None else b.detach().clone(),
                codec=codec,
                snapshot=None if codec is None else codec.snapshot(site.module, wname),
                path=site.path,
            )
        return rec

    @torch.no_grad()
    def _rebuild(self, rec: _Record) -> None:
        module = rec.module
        if rec.codec is not None:
            rec.codec.restore(module, rec.weight_name, rec.snapshot)
            rec.error = None
            record_error(module, None)
        else:
            getattr(module, rec.weight_name).data.copy_(rec.pristine_weight)
        bias = getattr(module, rec.bias_name, None)
        if rec.pristine_bias is not None and bias is not None:
            bias.data.copy_(rec.pristine_bias)
        elif rec.created_bias and bias is not None:
            bias.data.zero_()
        folds = [(a, True) for a in rec.residual] + [(a, False) for a in rec.merged]
        full = None
        if rec.codec is not None and folds:  # fold into a dequantized copy, then requantize
            full = rec.codec.dequantize(module, getattr(module, rec.weight_name)).float()
        for att, residual in folds:
            site = att.site
            assert isinstance(site, ModuleSite)
            weight, bias_view = self._views(site, full)
            fold = att.delta.residual if residual else att.delta.merged  # type: ignore[attr-defined]
            new_w, new_b = fold(weight, bias_view)
            weight.copy_(new_w.to(weight.dtype))
            if new_b is None:
                continue
            if bias_view is None:
                self._create_bias(rec, site, full)
                weight, bias_view = self._views(site, full)
            assert bias_view is not None
            bias_view.copy_(new_b.to(bias_view.dtype))
        if rec.codec is not None and full is not None:
            rec.codec.requantize(module, rec.weight_name, full)
            again = rec.codec.dequantize(module, getattr(module, rec.weight_name))
            rec.error = float((again.float() - full.float()).abs().max()) if full.numel() else 0.0
            record_error(module, rec.error)
        # writes through .data leave the parameters' version counters alone; bump them so
        # that anything cached from these weights (DoRA's ‖W‖²) sees the change
        for name in (rec.weight_name, rec.bias_name):
            param = getattr(module, name, None)
            if isinstance(param, Tensor):
                torch.autograd.graph.increment_version(param)
        if not rec.merged and not rec.residual:
            rec.error = None
            if rec.created_bias:
                del module._parameters[rec.bias_name]
                module.register_parameter(rec.bias_name, None)
            del self._records[(id(module), rec.weight_name)]

    @staticmethod
    def _views(site: ModuleSite, full: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The site's ``(weight, bias)`` views; on a quantized layer the weight rows are
        those of ``full``, the dequantized copy being folded into (layout ``linear``)."""
        if full is None:
            return site.weight_views()
        bias = site.parameter("bias")
        s = site.out_slice
        bv = None if bias is None else (bias.data[s[0] : s[1]] if s else bias.data)
        return (full[s[0] : s[1]] if s else full), bv

    def _create_bias(self, rec: _Record, site: ModuleSite, full: Tensor | None = None) -> None:
        w = getattr(rec.module, rec.weight_name) if full is None else full
        conv1d_t = site.weight is not None and site.weight.layout == "conv1d_t"
        n_out = w.shape[1] if conv1d_t else w.shape[0]
        bias = torch.zeros(n_out, dtype=w.dtype, device=w.device)
        setattr(rec.module, rec.bias_name, nn.Parameter(bias, requires_grad=False))
        rec.created_bias = True


def sync_residuals(ledger: MergeLedger, state: AdapterState, adapters: Iterable[Any]) -> None:
    """Hold in the weights the residuals of the deltas that run alone now: those of active
    adapters while adapters are enabled and no mixed batch runs (in a mixed batch, or
    disabled, every residual is out and such deltas add it back themselves)."""
    held: list[Attachment] = []
    if state.enabled and state.routing is None:
        by_name = {a.name: a for a in adapters}
        for name in state.active:
            for att in by_name[name].attachments:
                if callable(getattr(att.delta, "residual", None)):
                    held.append(att)
    if held or ledger.residuals():
        ledger.hold_residuals(held)
