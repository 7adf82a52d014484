"""PEFT's ``HRA`` as unipeft's ``hra``.

A PEFT HRA folder holds, per adapted module, ``hra_u`` ``(d_in · k, r)``: the unnormalised
reflection vectors, one per column, exactly unipeft's ``u``. Config: ``r`` and ``apply_GS``
map to ``r`` and ``apply_gs``, ``init_weights`` True/False to ``init`` "symmetric"/"random"
(the init only matters before training: the tensors are loaded over it). PEFT's HRA adapts
``nn.Linear`` and ``nn.Conv2d``; on a convolution its forward uses the first kernel, stride
and padding entry for every dimension and no dilation, so only square, symmetric,
undilated convolutions are converted. Its ``bias`` other than ``"none"`` is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ....contract.errors import LoadError
from ....contract.sites import ModuleSite
from ..codec import PeftCodec, PeftSite

if TYPE_CHECKING:
    from ....model import Adapter


def _refuse_bias(config: dict[str, Any]) -> None:
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise LoadError(
            f"this HRA adapter sets bias={bias!r}: it trains the backbone's biases, which "
            "unipeft's hra leaves alone. Train with bias='none'"
        )


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    _refuse_bias(config)
    return {
        "r": config.get("r", 8),
        "apply_gs": config.get("apply_GS", False),
        "init": "symmetric" if config.get("init_weights", True) else "random",
    }


def _config_out(adapter: Adapter) -> dict[str, Any]:
    cfg = adapter.config
    return {
        "r": cfg.r,  # type: ignore[attr-defined]
        "apply_GS": cfg.apply_gs,  # type: ignore[attr-defined]
        "init_weights": cfg.init == "symmetric",  # type: ignore[attr-defined]
        "bias": "none",
    }


def _state_in(site: PeftSite) -> dict[str, Tensor]:
    return {k: v for k, v in site.tensors.items() if k == "u"}


def _state_out(adapter: Adapter, site: ModuleSite) -> dict[str, Tensor]:
    return {"u": adapter.delta_at(site).u}  # type: ignore[dict-item]


def _site_refusal(site: ModuleSite) -> str | None:
    """PEFT's HRA adapts whole ``nn.Linear`` and ``nn.Conv2d`` modules; on a convolution it
    uses ``kernel_size[0]``, ``stride[0]`` and ``padding[0]`` for both dimensions and ignores
    dilation, so only convolutions where that is exact are converted."""
    module = site.module
    kind = type(module).__name__
    if site.entry is not None or site.out_slice is not None:
        return f"site {site.name!r} is not a whole module PEFT can name"
    if site.host is not None:
        return (
            f"module {site.path!r} is the out_proj of an nn.MultiheadAttention, whose forward "
            "does not call it as a module, so PEFT's HRA would not run there"
        )
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        k, s, p, dil = module.kernel_size, module.stride, module.padding, module.dilation
        if (
            k[0] != k[1]
            or s[0] != s[1]
            or isinstance(p, str)
            or p[0] != p[1]
            or dil != (1, 1)
            or module.padding_mode != "zeros"
        ):
            return (
                f"module {site.path!r} is an nn.Conv2d with kernel {k}, stride {s}, padding "
                f"{p!r}, dilation {dil}, padding_mode {module.padding_mode!r}; PEFT's HRA "
                "uses the first entry of each for both dimensions and no dilation, so it "
                "would compute another function. Only square, symmetric, undilated, "
                "zero-padded Conv2d modules convert"
            )
        return None
    return (
        f"module {site.path!r} ({kind}) is not an nn.Linear or nn.Conv2d, the only modules "
        "PEFT's HRA adapts (GPT-2's Conv1D and nn.Conv1d/3d are not)"
    )


CODECS = (
    PeftCodec(
        method="hra",
        absent_fields=frozenset({"fan_in_fan_out"}),
        peft_type="HRA",
        module_keys={"hra_u": "u"},
        config_in=_config_in,
        config_out=_config_out,
        state_in=_state_in,
        state_out=_state_out,
        site_refusal=_site_refusal,
        known_fields=frozenset({"r", "apply_GS", "init_weights", "bias"}),
    ),
)
