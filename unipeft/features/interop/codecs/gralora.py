"""PEFT's ``GRALORA`` as unipeft's ``gralora``.

A PEFT GraLoRA folder holds, per adapted module, ``gralora_A`` ``(k, d_in/k, r)`` and
``gralora_B`` ``(k, r, d_out/k)``, and with ``hybrid_r > 0`` also
``gralora_A_general.weight`` ``(hybrid_r, d_in)`` and ``gralora_B_general.weight``
``(d_out, hybrid_r)``: unipeft's ``A``, ``B``, ``A_hybrid`` and ``B_hybrid`` in the same
layouts. ``r``, ``alpha``, ``gralora_k`` and ``hybrid_r`` keep their names,
``gralora_dropout`` is ``dropout``. PEFT's GraLoRA adapts ``nn.Linear`` and GPT-2
``Conv1D`` modules; ``bias`` other than ``"none"`` is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from ....contract.sites import ModuleSite
from ..codec import PeftCodec, PeftSite
from .hira import module_refusal, refuse_fields

if TYPE_CHECKING:
    from ....model import Adapter

_PARTS = ("A", "B", "A_hybrid", "B_hybrid")


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    refuse_fields(
        "GRALORA",
        config,
        {
            "bias": "it trains the backbone's biases, which unipeft's adapters leave alone. "
            "Train with bias='none'"
        },
    )
    return {
        "r": config.get("r", 32),
        "alpha": config.get("alpha", 64),
        "gralora_k": config.get("gralora_k", 2),
        "hybrid_r": config.get("hybrid_r", 0),
        "dropout": config.get("gralora_dropout", 0.0),
    }


def _config_out(adapter: Adapter) -> dict[str, Any]:
    cfg = adapter.config
    alpha = cfg.alpha  # type: ignore[attr-defined]
    return {
        "r": cfg.r,  # type: ignore[attr-defined]
        "alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "gralora_k": cfg.gralora_k,  # type: ignore[attr-defined]
        "hybrid_r": cfg.hybrid_r,  # type: ignore[attr-defined]
        "gralora_dropout": cfg.dropout,  # type: ignore[attr-defined]
        "bias": "none",
        "init_weights": True,
    }


def _state_in(site: PeftSite) -> dict[str, Tensor]:
    parts = dict(site.tensors)
    return {n: parts[n] for n in _PARTS if n in parts}


def _state_out(adapter: Adapter, site: ModuleSite) -> dict[str, Tensor]:
    state = adapter.delta_at(site).state_dict()
    return {n: state[n] for n in _PARTS if n in state}


CODECS = (
    PeftCodec(
        method="gralora",
        absent_fields=frozenset({"exclude_modules"}),
        peft_type="GRALORA",
        module_keys={
            "gralora_A": "A",
            "gralora_B": "B",
            "gralora_A_general.weight": "A_hybrid",
            "gralora_B_general.weight": "B_hybrid",
        },
        config_in=_config_in,
        config_out=_config_out,
        state_in=_state_in,
        state_out=_state_out,
        site_refusal=lambda site: module_refusal("GraLoRA", site, ("linear", "conv1d_t")),
        known_fields=frozenset({"r", "alpha", "gralora_k", "hybrid_r", "gralora_dropout", "bias"}),
    ),
)
