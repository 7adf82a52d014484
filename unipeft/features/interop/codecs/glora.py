"""PEFT's ``GLORA`` as unipeft's ``glora``.

A PEFT GLoRA folder holds, per adapted module and per support ``S`` in A, B, C, D, E,
``glora_S.Xd`` and ``glora_S.Xu`` (a ``lora`` support), ``glora_S.X`` (``vector`` or
``constant``) or ``glora_S.zeros`` (a support set to ``none``, or C, D, E of a module
without a bias: a buffer of zeros). The first three map one to one onto the delta's
``S.Xd``, ``S.Xu``, ``S.X``; the zeros are checked to be zero and dropped on loading, and
written back on saving, so the folder is the one PEFT writes. ``r``, ``config_A_B``,
``config_C``, ``config_D_E`` and ``init_weights`` keep their names. PEFT's GLoRA adapts
plain ``nn.Linear`` modules only; its ``bias`` other than ``"none"`` is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ....contract.errors import LoadError
from ....contract.sites import ModuleSite
from ..codec import PeftCodec, PeftSite
from .hira import module_refusal
from .vera import refuse_bias

if TYPE_CHECKING:
    from ....model import Adapter

SUPPORTS = ("A", "B", "C", "D", "E")
KEYS = {f"glora_{s}.{t}": f"{s}.{t}" for s in SUPPORTS for t in ("Xd", "Xu", "X", "zeros")}


def _refusal(site: ModuleSite) -> str | None:
    why = module_refusal("GLoRA", site, ("linear",))
    if why is None and type(site.module) is not nn.Linear:
        return (
            f"module {site.path!r} is a {type(site.module).__name__}, a subclass of nn.Linear; "
            "PEFT's GLoRA adapts plain nn.Linear modules only"
        )
    return why


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    refuse_bias("GLORA", config, "glora_only")
    return {
        "r": config.get("r", 8),
        "config_A_B": config.get("config_A_B", "lora"),
        "config_C": config.get("config_C", "lora"),
        "config_D_E": config.get("config_D_E", "constant"),
        "init_weights": bool(config.get("init_weights", True)),
    }


def _config_out(adapter: Adapter) -> dict[str, Any]:
    cfg = adapter.config
    return {
        "r": cfg.r,  # type: ignore[attr-defined]
        "config_A_B": cfg.config_A_B,  # type: ignore[attr-defined]
        "config_C": cfg.config_C,  # type: ignore[attr-defined]
        "config_D_E": cfg.config_D_E,  # type: ignore[attr-defined]
        "init_weights": cfg.init_weights,  # type: ignore[attr-defined]
        "bias": "none",
    }


def _state_in(site: PeftSite) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for part, tensor in site.tensors.items():
        if not part.endswith(".zeros"):
            out[part] = tensor
        elif bool(tensor.ne(0).any()):
            raise LoadError(
                f"module {site.site.path!r}: glora_{part} is a support set to 'none' but holds "
                "non-zero values; the file was edited or is of another PEFT version"
            )
    return out


def _state_out(adapter: Adapter, site: ModuleSite) -> dict[str, Tensor]:
    delta = adapter.delta_at(site)
    out = {k: v for k, v in delta.state_dict().items()}
    weight, _ = site.weight_views()
    rows, cols = weight.shape[0], weight[0].numel()
    zeros = {"A": (rows, cols), "B": (rows, cols), "C": (cols, 1), "D": (rows,), "E": (rows,)}
    for name in SUPPORTS:
        if delta.kinds[name] == "none":  # type: ignore[index]
            out[f"{name}.zeros"] = torch.zeros(zeros[name], dtype=weight.dtype)
    return out


CODECS = (
    PeftCodec(
        method="glora",
        peft_type="GLORA",
        module_keys=KEYS,
        config_in=_config_in,
        config_out=_config_out,
        state_in=_state_in,
        state_out=_state_out,
        site_refusal=_refusal,
        known_fields=frozenset({"r", "config_A_B", "config_C", "config_D_E", "bias"}),
        absent_fields=frozenset(
            {"fan_in_fan_out", "exclude_modules", "layers_to_transform", "layers_pattern"}
        ),
    ),
)
