"""PEFT's ``VERA`` as unipeft's ``vera``.

A PEFT VeRA folder holds, per adapted module, ``vera_lambda_b`` ``(d_out,)`` and
``vera_lambda_d`` ``(r,)``, and once for the whole adapter the frozen projections
``base_model.vera_A`` ``(r, max d_in)`` and ``base_model.vera_B`` ``(max d_out, r)`` (when
saved with ``save_projection=True``, PEFT's default). They map one to one onto the deltas'
``lambda_b`` / ``lambda_d`` and the shared module's ``A`` / ``B``. PEFT's VeRA adapts
``nn.Linear`` and GPT-2 ``Conv1D`` modules only; its ``bias`` other than ``"none"`` is refused.

This module also holds what the RandLoRA and VB-LoRA codecs share with it: the site check
and the ``bias`` check.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from ....contract.errors import LoadError
from ....contract.sites import ModuleSite
from ..codec import PeftCodec, PeftSite

if TYPE_CHECKING:
    from ....model import Adapter


def linear_module_refusal(peft_name: str, site: ModuleSite) -> str | None:
    """Why PEFT's ``peft_name`` cannot adapt ``site`` as a module: it must be a whole
    ``nn.Linear`` or GPT-2 ``Conv1D``, called as a module (not an ``nn.MultiheadAttention``
    projection). None when it can."""
    kind = type(site.module).__name__
    if site.weight is None or site.weight.layout not in ("linear", "conv1d_t"):
        return (
            f"module {site.path!r} ({kind}) is not an nn.Linear or GPT-2 Conv1D, the only "
            f"modules PEFT's {peft_name} adapts"
        )
    if site.entry is not None:
        return f"site {site.name!r} is a path between modules, not a module PEFT can name"
    if site.host is not None:
        return (
            f"module {site.path!r} is the out_proj of an nn.MultiheadAttention, whose forward "
            f"does not call it as a module, so PEFT's {peft_name} would not run there"
        )
    return None


def refuse_bias(peft_type: str, config: dict[str, Any], flavour: str) -> None:
    """Raise :class:`LoadError` when a PEFT config trains the backbone's biases."""
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise LoadError(
            f"this {peft_type} adapter sets bias={bias!r}: it trains the backbone's biases "
            f"(with bias='all' or '{flavour}'), which unipeft's adapters leave alone. "
            "Train with bias='none'"
        )


def tensors(parts: dict[str, Tensor], names: tuple[str, ...]) -> dict[str, Tensor]:
    """The entries of ``parts`` named in ``names`` (missing ones are reported by the loader,
    which compares the result with the delta's state dict)."""
    return {n: parts[n] for n in names if n in parts}


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    refuse_bias("VERA", config, "vera_only")
    return {
        "r": config.get("r", 256),
        "d_initial": config.get("d_initial", 0.1),
        "dropout": config.get("vera_dropout", 0.0),
        "projection_seed": config.get("projection_prng_key", 0),
        "save_projection": config.get("save_projection", True),
    }


def _config_out(adapter: Adapter) -> dict[str, Any]:
    cfg = adapter.config
    return {
        "r": cfg.r,  # type: ignore[attr-defined]
        "d_initial": cfg.d_initial,  # type: ignore[attr-defined]
        "vera_dropout": cfg.dropout,  # type: ignore[attr-defined]
        "projection_prng_key": cfg.projection_seed,  # type: ignore[attr-defined]
        "save_projection": cfg.save_projection,  # type: ignore[attr-defined]
        "bias": "none",
        "init_weights": True,
    }


def _state_in(site: PeftSite) -> dict[str, Tensor]:
    return tensors(dict(site.tensors), ("lambda_b", "lambda_d"))


def _state_out(adapter: Adapter, site: ModuleSite) -> dict[str, Tensor]:
    delta = adapter.delta_at(site)
    return {"lambda_b": delta.lambda_b, "lambda_d": delta.lambda_d}  # type: ignore[dict-item]


def _shared_in(config: dict[str, Any], cfg: Any, parts: Any) -> dict[str, Tensor]:
    return tensors(dict(parts), ("A", "B"))


def _shared_out(adapter: Adapter) -> dict[str, Tensor]:
    if not adapter.config.save_projection:  # type: ignore[attr-defined]
        return {}  # PEFT redraws them from projection_prng_key, as unipeft does
    shared = adapter.shared
    return {"A": shared.A, "B": shared.B}  # type: ignore[union-attr,dict-item]


CODECS = (
    PeftCodec(
        method="vera",
        shared_optional=True,
        absent_fields=frozenset({"exclude_modules"}),
        peft_type="VERA",
        module_keys={"vera_lambda_b": "lambda_b", "vera_lambda_d": "lambda_d"},
        shared_keys={"base_model.vera_A": "A", "base_model.vera_B": "B"},
        config_in=_config_in,
        config_out=_config_out,
        state_in=_state_in,
        state_out=_state_out,
        shared_in=_shared_in,
        shared_out=_shared_out,
        site_refusal=lambda site: linear_module_refusal("VeRA", site),
        known_fields=frozenset(
            {"r", "d_initial", "vera_dropout", "projection_prng_key", "save_projection", "bias"}
        ),
    ),
)
