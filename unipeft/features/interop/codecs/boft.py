"""PEFT's ``BOFT`` as unipeft's ``boft``.

A PEFT BOFT folder holds, per adapted module, ``boft_R`` ``(m, n, b, b)`` (the free blocks
whose skew parts are Cayley-transformed: unipeft's ``blocks``) and ``boft_s``, the output
scale: ``(out, 1)`` on an ``nn.Linear``, ``(1, out)`` on an ``nn.Conv2d`` (unipeft's
``scale`` ``(out,)``). Config: ``boft_block_size`` and ``boft_block_num`` map to the fields
of the same names (PEFT's 0, "not set", is None here), ``boft_n_butterfly_factor`` and
``boft_dropout`` one to one. ``init_weights`` only matters before training; a ``bias``
other than ``"none"`` is refused. PEFT computes more than one butterfly factor only with
its CUDA extension (without it, it builds ``m = 1`` and cannot load such a folder);
unipeft computes any ``m`` on any device.

Modules: PEFT's BOFT adapts whole ``nn.Linear`` and ``nn.Conv2d`` modules. On a Conv2d its
forward uses ``kernel_size[0]``, ``stride[0]`` and ``padding[0]`` for both dimensions and no
dilation or groups, so only square, symmetric, undilated, ungrouped, zero-padded
convolutions convert.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ....contract.sites import ModuleSite
from ..codec import PeftCodec, PeftSite
from .oft import refuse_bias, sizes_fit, unset_zero, whole_module_refusal

if TYPE_CHECKING:
    from ....model import Adapter


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    refuse_bias("BOFT", config)
    return {
        "boft_block_size": unset_zero(config.get("boft_block_size", 4)),
        "boft_block_num": unset_zero(config.get("boft_block_num", 0)),
        "boft_n_butterfly_factor": config.get("boft_n_butterfly_factor", 1),
        "boft_dropout": config.get("boft_dropout", 0.0),
    }


def _config_out(adapter: Adapter) -> dict[str, Any]:
    cfg: Any = adapter.config
    return {
        "boft_block_size": cfg.boft_block_size or 0,
        "boft_block_num": cfg.boft_block_num or 0,
        "boft_n_butterfly_factor": cfg.boft_n_butterfly_factor,
        "boft_dropout": cfg.boft_dropout,
        "init_weights": True,
        "bias": "none",
    }


def _state_in(site: PeftSite) -> dict[str, Tensor]:
    sizes_fit("BOFT", "boft", site)
    out = {}
    if "blocks" in site.tensors:
        out["blocks"] = site.tensors["blocks"]
    if "scale" in site.tensors:
        s = site.tensors["scale"]
        out["scale"] = s.reshape(-1) if s.ndim == 2 and 1 in s.shape else s
    return out


def _state_out(adapter: Adapter, site: ModuleSite) -> dict[str, Tensor]:
    delta: Any = adapter.delta_at(site)
    conv = isinstance(site.module, nn.Conv2d)
    scale = delta.scale.reshape(1, -1) if conv else delta.scale.reshape(-1, 1)
    return {"blocks": delta.blocks, "scale": scale}


def _site_refusal(site: ModuleSite) -> str | None:
    why = whole_module_refusal(site, "BOFT")
    if why is not None:
        return why
    module = site.module
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
            or module.groups != 1
            or module.padding_mode != "zeros"
        ):
            return (
                f"module {site.path!r} is an nn.Conv2d with kernel {k}, stride {s}, padding "
                f"{p!r}, dilation {dil}, groups {module.groups}, padding_mode "
                f"{module.padding_mode!r}; PEFT's BOFT uses the first entry of each for both "
                "dimensions, without dilation or groups, so it would compute another "
                "function. Only square, symmetric, undilated, ungrouped, zero-padded Conv2d "
                "modules convert"
            )
        return None
    return (
        f"module {site.path!r} ({type(module).__name__}) is not an nn.Linear or nn.Conv2d, "
        "the projections PEFT's BOFT adapts (GPT-2's Conv1D and nn.Conv1d/3d are not)"
    )


CODECS = (
    PeftCodec(
        method="boft",
        peft_type="BOFT",
        module_keys={"boft_R": "blocks", "boft_s": "scale"},
        config_in=_config_in,
        config_out=_config_out,
        state_in=_state_in,
        state_out=_state_out,
        site_refusal=_site_refusal,
        known_fields=frozenset(
            {
                "boft_block_size",
                "boft_block_num",
                "boft_n_butterfly_factor",
                "boft_dropout",
                "init_weights",
                "bias",
            }
        ),
    ),
)
