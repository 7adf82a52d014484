"""PEFT's ``LN_TUNING`` as unipeft's ``ln_tuning``.

PEFT's LN tuning replaces each targeted module by a trained copy, and a PEFT folder holds
the copy's whole state: ``<module>.ln_tuning_layers.weight`` and, for a norm with a bias,
``<module>.ln_tuning_layers.bias``, both of the norm's own shape. unipeft's ``ln_tuning``
keeps the backbone's norm frozen and trains the change ``Δw``, ``Δb`` (the delta's
``values``, ``(2, *shape)``, or ``(1, *shape)`` without a bias). Loading therefore subtracts
the backbone's own norm weights (read through the site, ``site.weight_views()``) from PEFT's
trained ones, and saving adds them back: the folder must be loaded on the backbone it was
trained on (the same norm weights), exactly as PEFT's own folder must. A norm into which an
adapter is merged reads as its merged weights, so save an ``ln_tuning`` adapter unmerged.

LN tuning has no hyperparameters besides its targets. PEFT can copy any module; unipeft
tunes LayerNorm and RMSNorm modules only (``unipeft.methods.selective.ln_tuning``), and
refuses the others, naming the module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ....contract.errors import AdapterError, LoadError
from ....contract.sites import ModuleSite
from ....methods.selective.ln_tuning import norm_spec
from ..codec import PeftCodec, PeftSite

if TYPE_CHECKING:
    from ....model import Adapter


def _refusal(site: ModuleSite) -> str | None:
    kind = type(site.module).__name__
    if site.entry is not None or site.out_slice is not None or site.weight is not None:
        return (
            f"module {site.path!r} ({kind}) is not a norm; unipeft's ln_tuning tunes LayerNorm "
            "and RMSNorm modules only (PEFT's LN_TUNING copies any module)"
        )
    spec = norm_spec(site.module)
    return f"module {site.path!r}: {spec}" if isinstance(spec, str) else None


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    return {}


def _config_out(adapter: Adapter) -> dict[str, Any]:
    return {}


def _wide(a: Tensor, b: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)


def _state_in(peft: PeftSite) -> dict[str, Tensor]:
    site = peft.site
    with torch.no_grad():
        weight, bias = site.weight_views()
    if "weight" not in peft.tensors:
        raise LoadError(
            f"module {site.path!r} has no ln_tuning_layers.weight in the folder; the file is "
            "incomplete"
        )
    trained_bias = peft.tensors.get("bias")
    if (trained_bias is None) != (bias is None):
        has = "has" if bias is not None else "has no"
        raise LoadError(
            f"module {site.path!r} {has} a bias in this backbone, but the folder "
            f"{'lacks' if trained_bias is None else 'holds'} ln_tuning_layers.bias; the adapter "
            "was trained on another model"
        )
    rows = []
    for name, trained, base in (
        ("weight", peft.tensors["weight"], weight),
        ("bias", trained_bias, bias),
    ):
        if base is None or trained is None:
            continue
        if tuple(trained.shape) != tuple(base.shape):
            raise LoadError(
                f"module {site.path!r}: ln_tuning_layers.{name} has shape {tuple(trained.shape)} "
                f"but the backbone's norm has {tuple(base.shape)}; the adapter was trained on a "
                "backbone of another size"
            )
        dtype = _wide(trained, base)
        rows.append(trained.to(dtype) - base.detach().to(device=trained.device, dtype=dtype))
    return {"values": torch.stack(rows)}


def _state_out(adapter: Adapter, site: ModuleSite) -> dict[str, Tensor]:
    if any(a.merged for a in adapter.attachments if a.site.name == site.name):
        raise AdapterError(
            f"adapter {adapter.name!r} is merged into {site.path!r}; PEFT's LN_TUNING folder "
            "holds the trained norm, which unipeft computes from the unmerged weights. "
            "unmerge() it before saving"
        )
    values = adapter.delta_at(site).values.detach()
    with torch.no_grad():
        weight, bias = site.weight_views()
    out = {"weight": (weight.to(values.dtype) + values[0].reshape(weight.shape)).to(weight.dtype)}
    if bias is not None and values.shape[0] > 1:
        out["bias"] = (bias.to(values.dtype) + values[1].reshape(bias.shape)).to(bias.dtype)
    return out


CODECS = (
    PeftCodec(
        method="ln_tuning",
        absent_fields=frozenset({"fan_in_fan_out", "layers_to_transform", "layers_pattern"}),
        peft_type="LN_TUNING",
        module_keys={"ln_tuning_layers.weight": "weight", "ln_tuning_layers.bias": "bias"},
        config_in=_config_in,
        config_out=_config_out,
        state_in=_state_in,
        state_out=_state_out,
        site_refusal=_refusal,
    ),
)
