"""PEFT's ``MISS`` as unipeft's ``miss``.

A PEFT MiSS folder holds, per adapted module, ``miss_block``: ``(r, d_out)`` (balance),
``(r, mini_r)`` (mini) or ``(d_out / r, r, r)`` (bat), exactly unipeft's ``block``. Config:
``r`` and ``mini_r`` by name, ``miss_dropout`` -> ``dropout``, and ``init_weights``, which in
PEFT chooses both the variant and the init: True -> ``variant="balance"``, ``init="zeros"``;
False -> ``variant="balance"``, ``init="random"``; ``"bat"`` / ``"mini"`` -> that variant
(the init only matters before training: the tensors are loaded over it). PEFT's MiSS adapts
``nn.Linear`` modules only (not GPT-2's Conv1D). Its ``bias`` other than ``"none"`` is
refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ....contract.errors import LoadError
from ....contract.sites import ModuleSite
from ..codec import PeftCodec, PeftSite

if TYPE_CHECKING:
    from ....model import Adapter


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise LoadError(
            f"this MISS adapter sets bias={bias!r}: it trains the backbone's biases, which "
            "unipeft's miss leaves alone. Train with bias='none'"
        )
    init = config.get("init_weights", True)
    if init in ("bat", "mini"):
        variant, start = init, "zeros"
    elif isinstance(init, bool):
        variant, start = "balance", "zeros" if init else "random"
    else:
        raise LoadError(
            f"this MISS adapter has init_weights={init!r}; PEFT writes True, False, 'bat' or "
            "'mini' there"
        )
    return {
        "r": config.get("r", 64),
        "mini_r": config.get("mini_r", 1),
        "dropout": config.get("miss_dropout", 0.0),
        "variant": variant,
        "init": start,
    }


def _config_out(adapter: Adapter) -> dict[str, Any]:
    cfg = adapter.config
    variant = cfg.variant  # type: ignore[attr-defined]
    init: bool | str = variant if variant != "balance" else cfg.init == "zeros"  # type: ignore[attr-defined]
    return {
        "r": cfg.r,  # type: ignore[attr-defined]
        "mini_r": cfg.mini_r,  # type: ignore[attr-defined]
        "miss_dropout": cfg.dropout,  # type: ignore[attr-defined]
        "init_weights": init,
        "bias": "none",
    }


def _state_in(site: PeftSite) -> dict[str, Tensor]:
    return {k: v for k, v in site.tensors.items() if k == "block"}


def _state_out(adapter: Adapter, site: ModuleSite) -> dict[str, Tensor]:
    return {"block": adapter.delta_at(site).block}  # type: ignore[dict-item]


def _site_refusal(site: ModuleSite) -> str | None:
    """PEFT's MiSS adapts whole ``nn.Linear`` modules, called as modules."""
    if not isinstance(site.module, nn.Linear):
        return (
            f"module {site.path!r} ({type(site.module).__name__}) is not an nn.Linear, the only "
            "module PEFT's MiSS adapts (GPT-2's Conv1D and convolutions are not)"
        )
    if site.entry is not None or site.out_slice is not None:
        return f"site {site.name!r} is not a whole module PEFT can name"
    if site.host is not None:
        return (
            f"module {site.path!r} is the out_proj of an nn.MultiheadAttention, whose forward "
            "does not call it as a module, so PEFT's MiSS would not run there"
        )
    return None


CODECS = (
    PeftCodec(
        method="miss",
        absent_fields=frozenset({"fan_in_fan_out"}),
        peft_type="MISS",
        module_keys={"miss_block": "block"},
        config_in=_config_in,
        config_out=_config_out,
        state_in=_state_in,
        state_out=_state_out,
        site_refusal=_site_refusal,
        known_fields=frozenset({"r", "mini_r", "miss_dropout", "init_weights", "bias"}),
    ),
)
