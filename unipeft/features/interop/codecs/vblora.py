"""PEFT's ``VBLORA`` as unipeft's ``vblora``.

A PEFT VB-LoRA folder holds, per adapted module, ``vblora_logits_A`` ``(r, d_in/L, N)`` and
``vblora_logits_B`` ``(d_out/L, r, N)``, and once for the adapter the trained bank
``base_model.vblora_vector_bank`` ``(N, L)``: the deltas' ``logits_A`` / ``logits_B`` and the
shared module's ``vectors``. Saved with ``save_only_topk_weights=True``, a module holds instead
``vblora_logits_{A,B}_topk_indices`` (integers, ``(..., topk)``) and
``vblora_logits_{A,B}_topk_weights`` (the first ``topk - 1`` softmax weights): loading rebuilds
logits whose top-k softmax gives those weights, ``-inf`` elsewhere, as PEFT does (enough for
inference and merging; the other logits cannot train back), and saving writes that form when
the adapter's config asks for it. ``bias`` other than ``"none"`` is refused; PEFT's VB-LoRA
adapts ``nn.Linear`` and GPT-2 ``Conv1D`` modules only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ....contract.errors import LoadError
from ....contract.sites import ModuleSite
from ..codec import PeftCodec, PeftSite
from .vera import linear_module_refusal, refuse_bias

if TYPE_CHECKING:
    from ....model import Adapter

_FIELDS = (
    "r",
    "num_vectors",
    "vector_length",
    "topk",
    "init_vector_bank_bound",
    "init_logits_std",
    "save_only_topk_weights",
)


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    refuse_bias("VBLORA", config, "vblora_only")
    out = {name: config[name] for name in _FIELDS if name in config}
    out["dropout"] = config.get("vblora_dropout", 0.0)
    return out


def _config_out(adapter: Adapter) -> dict[str, Any]:
    cfg: Any = adapter.config
    out = {name: getattr(cfg, name) for name in _FIELDS}
    out.update({"vblora_dropout": cfg.dropout, "bias": "none"})
    return out


def index_dtype(num_vectors: int) -> torch.dtype:
    """The smallest integer dtype PEFT stores top-k indices of a bank of this size in."""
    if num_vectors < 2**8:
        return torch.uint8
    if num_vectors < 2**15:
        return torch.int16
    if num_vectors < 2**31:
        return torch.int32
    return torch.int64


def logits_from_topk(
    where: str, indices: Tensor, weights: Tensor, num_vectors: int, topk: int
) -> Tensor:
    """Logits ``(..., num_vectors)`` whose top-``topk`` softmax is ``weights`` (the first
    ``topk - 1`` given, the last their complement to 1) at ``indices``, ``-inf`` elsewhere."""
    index = indices.to(torch.long)
    if index.shape[-1] != topk or tuple(weights.shape) != (*index.shape[:-1], topk - 1):
        raise LoadError(
            f"module {where!r}: the top-k tensors have shapes {tuple(indices.shape)} (indices) "
            f"and {tuple(weights.shape)} (weights), but topk={topk} needs (..., {topk}) and "
            f"(..., {topk - 1})"
        )
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_vectors):
        raise LoadError(
            f"module {where!r}: a top-k index lies outside the bank of num_vectors="
            f"{num_vectors} vectors; the file is corrupt or of another config"
        )
    w = weights.float()
    full = torch.cat([w, 1 - w.sum(-1, keepdim=True)], dim=-1)
    logits = torch.full((*index.shape[:-1], num_vectors), float("-inf"))
    return logits.scatter(-1, index, torch.log(full))


def _state_in(site: PeftSite) -> dict[str, Tensor]:
    parts = dict(site.tensors)
    cfg: Any = site.config
    out: dict[str, Tensor] = {}
    for side in ("A", "B"):
        name = f"logits_{side}"
        if name in parts:
            out[name] = parts[name]
        elif f"{side}_indices" in parts and f"{side}_weights" in parts:
            out[name] = logits_from_topk(
                site.site.path,
                parts[f"{side}_indices"],
                parts[f"{side}_weights"],
                cfg.num_vectors,
                cfg.topk,
            )
    return out


def _state_out(adapter: Adapter, site: ModuleSite) -> dict[str, Tensor]:
    delta: Any = adapter.delta_at(site)
    cfg: Any = adapter.config
    if not cfg.save_only_topk_weights:
        return {"logits_A": delta.logits_A, "logits_B": delta.logits_B}
    out: dict[str, Tensor] = {}
    for side in ("A", "B"):
        top, index = getattr(delta, f"logits_{side}").detach().topk(cfg.topk, dim=-1)
        out[f"{side}_indices"] = index.to(index_dtype(cfg.num_vectors))
        out[f"{side}_weights"] = torch.softmax(top, dim=-1)[..., :-1].contiguous()
    return out


def _shared_in(config: dict[str, Any], cfg: Any, parts: Any) -> dict[str, Tensor]:
    return {"vectors": parts["vectors"]} if "vectors" in parts else {}


def _shared_out(adapter: Adapter) -> dict[str, Tensor]:
    shared: Any = adapter.shared
    return {"vectors": shared.vectors}


CODECS = (
    PeftCodec(
        method="vblora",
        peft_type="VBLORA",
        module_keys={
            "vblora_logits_A": "logits_A",
            "vblora_logits_B": "logits_B",
            "vblora_logits_A_topk_indices": "A_indices",
            "vblora_logits_A_topk_weights": "A_weights",
            "vblora_logits_B_topk_indices": "B_indices",
            "vblora_logits_B_topk_weights": "B_weights",
        },
        shared_keys={"base_model.vblora_vector_bank": "vectors"},
        integer_parts=frozenset({"A_indices", "B_indices"}),
        config_in=_config_in,
        config_out=_config_out,
        state_in=_state_in,
        state_out=_state_out,
        shared_in=_shared_in,
        shared_out=_shared_out,
        site_refusal=lambda site: linear_module_refusal("VB-LoRA", site),
        known_fields=frozenset({*_FIELDS, "vblora_dropout", "bias"}),
    ),
)
