"""PEFT's ``LOHA`` as unipeft's ``loha``.

A PEFT LoHa folder holds, per adapted module, ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``,
``hada_w2_b`` and, on a convolution with ``use_effective_conv2d`` and a kernel larger than
1, the cores ``hada_t1``, ``hada_t2``. They are unipeft's ``w1_a`` ... ``t2`` with the same
shapes, except that PEFT stores an ``nn.Conv1d``'s core as ``(r, r, k, 1)`` and unipeft as
``(r, r, k)``. ``r``, ``alpha``, ``rank_dropout``, ``module_dropout`` and
``use_effective_conv2d`` map one to one; ``init_weights`` True/False is ``init``
``"default"``/``"random"`` (it only decides how a new adapter starts). PEFT's LoHa adapts
``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` modules only (not GPT-2 ``Conv1D``, not
``nn.Conv3d``); ``rank_pattern`` and ``alpha_pattern`` are refused.

This module also holds what the LoKr codec shares with it: :func:`lycoris_refusal`,
:func:`refuse_patterns`, :func:`plain_number` and the core reshapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from ....contract.errors import LoadError
from ....contract.sites import ModuleSite
from ..codec import PeftCodec, PeftSite

if TYPE_CHECKING:
    from ....model import Adapter


def lycoris_refusal(peft_name: str, site: ModuleSite) -> str | None:
    """Why PEFT's LyCORIS types (LoHa, LoKr), which adapt whole ``nn.Linear``,
    ``nn.Conv1d`` and ``nn.Conv2d`` modules, cannot adapt ``site`` (None when they can)."""
    kind = type(site.module).__name__
    ref = site.weight
    if ref is None or ref.layout not in ("linear", "conv") or len(ref.kernel_size) > 2:
        return (
            f"module {site.path!r} ({kind}) is not one PEFT's {peft_name} adapts (nn.Linear, "
            "nn.Conv1d, nn.Conv2d). unipeft's own adapter works there, but cannot be "
            "exchanged with PEFT"
        )
    if site.entry is not None:
        return f"site {site.name!r} is a path between modules, not a module PEFT can name"
    if site.out_slice is not None:
        return (
            f"site {site.name!r} is a slice of the fused module {site.path!r}, which PEFT "
            "adapts whole; target the whole module"
        )
    if site.host is not None:
        return (
            f"module {site.path!r} is the out_proj of an nn.MultiheadAttention, whose forward "
            f"does not call it as a module, so PEFT's {peft_name} would not run there"
        )
    return None


def refuse_patterns(peft_type: str, method: str, config: dict[str, Any]) -> None:
    """Refuse per-module ranks and alphas: a unipeft adapter has one config."""
    for name, what in (("rank_pattern", "ranks"), ("alpha_pattern", "alphas")):
        value = config.get(name)
        if value not in (None, {}):
            raise LoadError(
                f"this {peft_type} adapter sets {name}={value!r}: {what} differ between "
                f"modules, and a unipeft {method} adapter has one. Train with one value, or "
                "split the modules into several adapters"
            )


def plain_number(value: float) -> float | int:
    """``alpha`` as PEFT writes it: an int when it is one."""
    return int(value) if float(value).is_integer() else value


def number(peft_type: str, config: dict[str, Any], name: str, default: float) -> float:
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LoadError(f"this {peft_type} config has {name}={value!r}; PEFT writes a number there")
    return value


def core_in(site: ModuleSite, core: Tensor) -> Tensor:
    """PEFT's Tucker core of an ``nn.Conv1d`` is ``(r, r, k, 1)``; unipeft's ``(r, r, k)``."""
    assert site.weight is not None
    if len(site.weight.kernel_size) == 1 and core.ndim == 4 and core.shape[-1] == 1:
        return core.reshape(core.shape[:3])
    return core


def core_out(site: ModuleSite, core: Tensor) -> Tensor:
    """The inverse of :func:`core_in`."""
    assert site.weight is not None
    if len(site.weight.kernel_size) == 1:
        return core.reshape(*core.shape, 1)
    return core


_PARTS = ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    refuse_patterns("LOHA", "loha", config)
    return {
        "r": number("LOHA", config, "r", 8),
        "alpha": float(number("LOHA", config, "alpha", 8)),
        "rank_dropout": float(config.get("rank_dropout") or 0.0),
        "module_dropout": float(config.get("module_dropout") or 0.0),
        "use_effective_conv2d": bool(config.get("use_effective_conv2d", False)),
        "init": "default" if config.get("init_weights", True) else "random",
    }


def _config_out(adapter: Adapter) -> dict[str, Any]:
    cfg: Any = adapter.config
    return {
        "r": cfg.r,
        "alpha": plain_number(cfg.alpha),
        "rank_dropout": cfg.rank_dropout,
        "module_dropout": cfg.module_dropout,
        "use_effective_conv2d": cfg.use_effective_conv2d,
        "init_weights": cfg.init == "default",
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _state_in(site: PeftSite) -> dict[str, Tensor]:
    out = {n: site.tensors[n] for n in _PARTS if n in site.tensors}
    for core in ("t1", "t2"):
        if core in out:
            out[core] = core_in(site.site, out[core])
    return out


def _state_out(adapter: Adapter, site: ModuleSite) -> dict[str, Tensor]:
    delta = adapter.delta_at(site)
    out = {n: p for n, p in delta.named_parameters() if n in _PARTS}
    for core in ("t1", "t2"):
        if core in out:
            out[core] = core_out(site, out[core])
    return out


CODECS = (
    PeftCodec(
        method="loha",
        absent_fields=frozenset({"fan_in_fan_out"}),
        peft_type="LOHA",
        module_keys={f"hada_{p}": p for p in _PARTS},
        config_in=_config_in,
        config_out=_config_out,
        state_in=_state_in,
        state_out=_state_out,
        site_refusal=lambda site: lycoris_refusal("LoHa", site),
        known_fields=frozenset(
            {
                "r",
                "alpha",
                "rank_dropout",
                "module_dropout",
                "use_effective_conv2d",
                "rank_pattern",
                "alpha_pattern",
            }
        ),
    ),
)
