"""PEFT's ``DELORA`` as unipeft's ``delora``.

A PEFT DeLoRA folder holds, per adapted module, ``delora_A`` ``(r, d_in)``, ``delora_B``
``(d_out, r)``, ``delora_lambda`` ``(1,)`` and ``delora_w_norm`` ``(d_in,)`` (the column
norms of the base weight when the adapter was created): unipeft's ``A``, ``B``, ``boundary``
and the buffer ``w_norm``, one to one. ``delora_lambda`` in the config is ``boundary``,
``module_dropout`` is ``dropout``. PEFT's DeLoRA adapts ``nn.Linear`` only (unipeft's also
adapts GPT-2 ``Conv1D`` and fused slices, which such a folder cannot hold); ``bias`` other
than ``"none"``, ``rank_pattern`` and ``lambda_pattern`` are refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from ....contract.sites import ModuleSite
from ..codec import PeftCodec, PeftSite
from .hira import module_refusal, refuse_fields

if TYPE_CHECKING:
    from ....model import Adapter

_REFUSED = {
    "bias": "it trains the backbone's biases, which unipeft's adapters leave alone. Train "
    "with bias='none'",
    "rank_pattern": "ranks differ between modules, and a unipeft delora adapter has one r. "
    "Train with one rank, or split the modules into several adapters",
    "lambda_pattern": "initial boundaries differ between modules, and a unipeft delora "
    "adapter has one. Train with one delora_lambda, or split the modules into several adapters",
}


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    refuse_fields("DELORA", config, _REFUSED)
    return {
        "r": config.get("r", 8),
        "boundary": config.get("delora_lambda", 15),
        "dropout": config.get("module_dropout", 0.0),
    }


def _config_out(adapter: Adapter) -> dict[str, Any]:
    cfg = adapter.config
    return {
        "r": cfg.r,  # type: ignore[attr-defined]
        "delora_lambda": _number(cfg.boundary),  # type: ignore[attr-defined]
        "module_dropout": cfg.dropout,  # type: ignore[attr-defined]
        "bias": "none",
        "init_weights": True,
        "rank_pattern": {},
        "lambda_pattern": {},
    }


def _state_in(site: PeftSite) -> dict[str, Tensor]:
    parts = dict(site.tensors)
    out = {n: parts[n] for n in ("A", "B", "w_norm") if n in parts}
    if "boundary" in parts:
        out["boundary"] = parts["boundary"].reshape(-1)
    return out


def _state_out(adapter: Adapter, site: ModuleSite) -> dict[str, Tensor]:
    delta = adapter.delta_at(site)
    return {
        "A": delta.A,  # type: ignore[dict-item]
        "B": delta.B,  # type: ignore[dict-item]
        "boundary": delta.boundary,  # type: ignore[dict-item]
        "w_norm": delta.w_norm,  # type: ignore[dict-item]
    }


CODECS = (
    PeftCodec(
        method="delora",
        absent_fields=frozenset({"fan_in_fan_out"}),
        peft_type="DELORA",
        module_keys={
            "delora_A": "A",
            "delora_B": "B",
            "delora_lambda": "boundary",
            "delora_w_norm": "w_norm",
        },
        config_in=_config_in,
        config_out=_config_out,
        state_in=_state_in,
        state_out=_state_out,
        site_refusal=lambda site: module_refusal("DeLoRA", site, ("linear",)),
        known_fields=frozenset({"r", "delora_lambda", "module_dropout", *_REFUSED}),
    ),
)
