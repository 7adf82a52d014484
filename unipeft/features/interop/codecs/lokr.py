"""PEFT's ``LOKR`` as unipeft's ``lokr``.

A PEFT LoKr folder holds, per adapted module, ``lokr_w1`` (or ``lokr_w1_a`` and
``lokr_w1_b``), ``lokr_w2`` (or ``lokr_w2_a`` and ``lokr_w2_b``) and, on a convolution with
``use_effective_conv2d``, ``lokr_t2``. Which of them a module has follows from its widths and
the config, by the same rule on both sides (:func:`unipeft.methods.reparameterized.lokr.
kron_layout`); the tensors are unipeft's ``w1`` ... ``t2`` with the same shapes, except that
PEFT stores an ``nn.Conv1d``'s core as ``(r, r, k, 1)`` and unipeft as ``(r, r, k)``.
``r``, ``alpha``, ``rank_dropout``, ``rank_dropout_scale``, ``module_dropout``,
``use_effective_conv2d`` and ``decompose_both`` map one to one; ``decompose_factor`` -1 is
``None`` (a value below 1 other than -1 splits a width as 1 does, so it becomes 1);
``init_weights`` True / ``"lycoris"`` / False is ``init`` ``"default"`` / ``"lycoris"`` /
``"random"`` (it only decides how a new adapter starts). PEFT's LoKr adapts ``nn.Linear``,
``nn.Conv1d`` and ``nn.Conv2d`` modules only; ``rank_pattern`` and ``alpha_pattern`` are
refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from ....contract.errors import LoadError
from ....contract.sites import ModuleSite
from ..codec import PeftCodec, PeftSite
from .loha import core_in, core_out, lycoris_refusal, number, plain_number, refuse_patterns

if TYPE_CHECKING:
    from ....model import Adapter

_PARTS = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")
_INIT_IN = {True: "default", False: "random", "lycoris": "lycoris"}
_INIT_OUT = {v: k for k, v in _INIT_IN.items()}


def _factor(config: dict[str, Any]) -> int | None:
    value = config.get("decompose_factor", -1)
    if isinstance(value, bool) or not isinstance(value, int):
        raise LoadError(f"this LOKR config has decompose_factor={value!r}; PEFT writes an int")
    if value == -1:
        return None
    return value if value >= 1 else 1


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    refuse_patterns("LOKR", "lokr", config)
    init = config.get("init_weights", True)
    if init not in _INIT_IN:
        raise LoadError(
            f"this LOKR config has init_weights={init!r}; PEFT writes true, false or 'lycoris'"
        )
    return {
        "r": number("LOKR", config, "r", 8),
        "alpha": float(number("LOKR", config, "alpha", 8)),
        "rank_dropout": float(config.get("rank_dropout") or 0.0),
        "rank_dropout_scale": bool(config.get("rank_dropout_scale", False)),
        "module_dropout": float(config.get("module_dropout") or 0.0),
        "use_effective_conv2d": bool(config.get("use_effective_conv2d", False)),
        "decompose_both": bool(config.get("decompose_both", False)),
        "decompose_factor": _factor(config),
        "init": _INIT_IN[init],
    }


def _config_out(adapter: Adapter) -> dict[str, Any]:
    cfg: Any = adapter.config
    return {
        "r": cfg.r,
        "alpha": plain_number(cfg.alpha),
        "rank_dropout": cfg.rank_dropout,
        "rank_dropout_scale": cfg.rank_dropout_scale,
        "module_dropout": cfg.module_dropout,
        "use_effective_conv2d": cfg.use_effective_conv2d,
        "decompose_both": cfg.decompose_both,
        "decompose_factor": -1 if cfg.decompose_factor is None else cfg.decompose_factor,
        "init_weights": _INIT_OUT[cfg.init],
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _state_in(site: PeftSite) -> dict[str, Tensor]:
    out = {n: site.tensors[n] for n in _PARTS if n in site.tensors}
    if "t2" in out:
        out["t2"] = core_in(site.site, out["t2"])
    return out


def _state_out(adapter: Adapter, site: ModuleSite) -> dict[str, Tensor]:
    delta = adapter.delta_at(site)
    out = {n: p for n, p in delta.named_parameters() if n in _PARTS}
    if "t2" in out:
        out["t2"] = core_out(site, out["t2"])
    return out


CODECS = (
    PeftCodec(
        method="lokr",
        absent_fields=frozenset({"fan_in_fan_out"}),
        peft_type="LOKR",
        module_keys={f"lokr_{p}": p for p in _PARTS},
        config_in=_config_in,
        config_out=_config_out,
        state_in=_state_in,
        state_out=_state_out,
        site_refusal=lambda site: lycoris_refusal("LoKr", site),
        known_fields=frozenset(
            {
                "r",
                "alpha",
                "rank_dropout",
                "rank_dropout_scale",
                "module_dropout",
                "use_effective_conv2d",
                "decompose_both",
                "decompose_factor",
                "rank_pattern",
                "alpha_pattern",
            }
        ),
    ),
)
