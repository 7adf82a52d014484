"""PEFT's ``C3A`` as unipeft's ``c3a``.

A PEFT C3A folder holds, per adapted module, ``c3a_kernel`` ``(d_out / b, d_in / b, b)``:
unipeft's ``kernel``, one to one. ``block_size`` is ``block_size``; ``init_weights`` only
decides how a new adapter starts (``True`` is ``init="zeros"``, ``False`` PEFT's
``"xavier_uniform"``, the other strings keep their names). PEFT's C3A adapts ``nn.Linear``
modules only; a ``block_size_pattern`` (a block size per module) and ``bias`` other than
``"none"`` are refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from ....contract.errors import LoadError
from ....contract.sites import ModuleSite
from ..codec import PeftCodec, PeftSite
from .hira import module_refusal, refuse_fields
from .vera import refuse_bias

if TYPE_CHECKING:
    from ....model import Adapter

_INITS = {"xavier_uniform", "kaiming_uniform", "gaussian"}


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    refuse_bias("C3A", config, "c3a_only")
    refuse_fields(
        "C3A",
        config,
        {
            "block_size_pattern": "block sizes differ between modules, and a unipeft c3a "
            "adapter has one block_size. Train with one block size, or split the modules "
            "into several adapters",
        },
    )
    init = config.get("init_weights", "xavier_uniform")
    if init is True:
        init = "zeros"
    elif init is False or init is None:
        init = "xavier_uniform"
    elif init not in _INITS:
        raise LoadError(
            f"this C3A config has init_weights={init!r}; PEFT writes True, False, "
            f"or one of {sorted(_INITS)}"
        )
    return {"block_size": config.get("block_size", 256), "init": init}


def _config_out(adapter: Adapter) -> dict[str, Any]:
    cfg = adapter.config
    init = cfg.init  # type: ignore[attr-defined]
    return {
        "block_size": cfg.block_size,  # type: ignore[attr-defined]
        "init_weights": True if init == "zeros" else init,
        "block_size_pattern": {},
        "bias": "none",
    }


def _state_in(site: PeftSite) -> dict[str, Tensor]:
    return {k: v for k, v in site.tensors.items() if k == "kernel"}


def _state_out(adapter: Adapter, site: ModuleSite) -> dict[str, Tensor]:
    return {"kernel": adapter.delta_at(site).kernel}  # type: ignore[dict-item]


CODECS = (
    PeftCodec(
        method="c3a",
        absent_fields=frozenset({"fan_in_fan_out", "exclude_modules"}),
        peft_type="C3A",
        module_keys={"c3a_kernel": "kernel"},
        config_in=_config_in,
        config_out=_config_out,
        state_in=_state_in,
        state_out=_state_out,
        site_refusal=lambda site: module_refusal("C3A", site, ("linear",)),
        known_fields=frozenset({"block_size", "block_size_pattern", "bias"}),
    ),
)
