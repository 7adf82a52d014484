"""PEFT's ``SHIRA`` as unipeft's ``shira``.

A PEFT SHiRA folder holds, per adapted module, ``shira_weight`` ``(K,)`` (the trained
entries) and ``shira_indices`` ``(2, K)`` (their rows and columns in the ``(d_out, d_in)``
weight, int32; PEFT writes them as float32 on Windows). unipeft's ``shira`` keeps the same
entries as ``values`` ``(K,)`` and their flat positions ``row · d_in + column`` as the int64
buffer ``indices`` ``(K,)``, in the same order. ``r`` and ``random_seed`` map one to one
(they only decided how the mask was drawn: a loaded adapter takes its indices from the
file); PEFT's ``mask_type`` is recorded as ``"random"`` whatever it was, since the file's
indices are what count. PEFT's SHiRA adapts ``nn.Linear`` modules only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ....contract.errors import LoadError
from ....contract.sites import ModuleSite
from ..codec import PeftCodec, PeftSite

if TYPE_CHECKING:
    from ....model import Adapter


def _refusal(site: ModuleSite) -> str | None:
    kind = type(site.module).__name__
    if site.weight is None or site.weight.layout != "linear":
        return (
            f"module {site.path!r} ({kind}) is not an nn.Linear, the only module PEFT's SHIRA "
            "adapts. unipeft's shira works there, but cannot be exchanged with PEFT"
        )
    if site.entry is not None:
        return f"site {site.name!r} is a path between modules, not a module PEFT can name"
    if site.host is not None:
        return (
            f"module {site.path!r} is the out_proj of an nn.MultiheadAttention, whose forward "
            "does not call it as a module, so PEFT's SHIRA would not run there"
        )
    return None


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    r = config.get("r", 32)  # PEFT's default
    if isinstance(r, bool) or not isinstance(r, int):
        raise LoadError(f"this SHIRA config has r={r!r}; PEFT writes an integer there")
    seed = config.get("random_seed")
    return {"r": r, "mask_type": "random", "random_seed": seed}


def _config_out(adapter: Adapter) -> dict[str, Any]:
    cfg: Any = adapter.config
    return {
        "r": cfg.r,
        "mask_type": cfg.mask_type,
        "random_seed": cfg.random_seed,
        "init_weights": True,
    }


def _state_in(peft: PeftSite) -> dict[str, Tensor]:
    site = peft.site
    assert site.weight is not None
    rows, cols = site.features, site.weight.in_features
    values, indices = peft.tensors.get("values"), peft.tensors.get("indices")
    if values is None or indices is None:
        raise LoadError(
            f"module {site.path!r} lacks shira_weight or shira_indices in the folder; the file "
            "is incomplete"
        )
    if indices.ndim != 2 or indices.shape[0] != 2 or indices.shape[1] != values.shape[0]:
        raise LoadError(
            f"module {site.path!r}: shira_indices has shape {tuple(indices.shape)}, but PEFT "
            f"writes (2, K) with K = {values.shape[0]}, the length of shira_weight"
        )
    if indices.is_floating_point():  # written on Windows: whole numbers as float32
        if not torch.equal(indices, indices.round()):
            raise LoadError(f"module {site.path!r}: shira_indices holds non-integer values")
    where = indices.to(torch.int64)
    row, col = where[0], where[1]
    if where.numel() and (row.min() < 0 or col.min() < 0 or row.max() >= rows or col.max() >= cols):
        raise LoadError(
            f"module {site.path!r}: shira_indices points outside the {rows}x{cols} weight; the "
            "adapter was trained on a backbone of another size"
        )
    flat = row * cols + col
    if flat.unique().numel() != flat.numel():
        raise LoadError(
            f"module {site.path!r}: shira_indices names some weight entries twice; a SHiRA "
            "mask holds each entry once"
        )
    return {"values": values, "indices": flat}


def _state_out(adapter: Adapter, site: ModuleSite) -> dict[str, Tensor]:
    assert site.weight is not None
    delta: Any = adapter.delta_at(site)
    cols = site.weight.in_features
    flat = delta.indices.detach().to(torch.int64)
    rows_cols = torch.stack([flat // cols, flat % cols]).to(torch.int32)
    return {"values": delta.values.detach(), "indices": rows_cols}


CODECS = (
    PeftCodec(
        method="shira",
        absent_fields=frozenset({"exclude_modules", "layers_to_transform", "layers_pattern"}),
        peft_type="SHIRA",
        module_keys={"shira_weight": "values", "shira_indices": "indices"},
        config_in=_config_in,
        config_out=_config_out,
        state_in=_state_in,
        state_out=_state_out,
        site_refusal=_refusal,
        known_fields=frozenset({"r", "mask_type", "random_seed"}),
        integer_parts=frozenset({"indices"}),
    ),
)
