"""PEFT's ``IA3`` as unipeft's ``ia3``, both forms.

A PEFT (IA)^3 folder holds one vector per adapted module, ``<module>.ia3_l``: on the output
side ``(d_out, 1)`` (a ``Conv2d`` / ``Conv3d``: ``(1, d_out, 1, 1[, 1])``), on the input side,
for the modules that ``feedforward_modules`` names, ``(1, d_in)`` (a convolution:
``(1, C_in, 1, 1[, 1])``). unipeft's ``ia3`` keeps ``l`` flat, ``(d_out,)`` or ``(d_in,)``,
and its ``feedforward`` field decides the form per site. The config converts both ways:

- PEFT's ``feedforward_modules`` as a list matches a module whose name ends with an entry
  (``key.endswith(entry)``); it becomes the regex ``.*<entry>|...`` that unipeft
  full-matches against the module path. As a string it is a regex PEFT full-matches
  against the module name, and unipeft does the same. ``None`` or ``[]``: no module.
- saving writes the feed-forward modules' paths as one anchored regex (or ``[]``).

``init_ia3_weights`` only decides how a new adapter starts (unipeft's ``init`` 1.0 is
``True``). PEFT's (IA)^3 adapts ``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Conv2d`` and
``nn.Conv3d`` modules (not ``nn.Conv1d``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ....contract.errors import LoadError
from ....contract.sites import ModuleSite
from ....methods.additive.ia3 import is_feedforward
from ..codec import PeftCodec, PeftSite

if TYPE_CHECKING:
    from ....model import Adapter


def _refusal(site: ModuleSite) -> str | None:
    kind = type(site.module).__name__
    ref = site.weight
    conv_ok = ref is not None and ref.layout == "conv" and len(ref.kernel_size) in (2, 3)
    if ref is None or not (ref.layout in ("linear", "conv1d_t") or conv_ok):
        return (
            f"module {site.path!r} ({kind}) is not one PEFT's IA3 adapts (nn.Linear, GPT-2 "
            "Conv1D, nn.Conv2d, nn.Conv3d). unipeft's ia3 works there, but cannot be exchanged "
            "with PEFT"
        )
    if site.entry is not None:
        return f"site {site.name!r} is a path between modules, not a module PEFT can name"
    if site.host is not None:
        return (
            f"module {site.path!r} is the out_proj of an nn.MultiheadAttention, whose forward "
            "does not call it as a module, so PEFT's IA3 would not run there"
        )
    return None


def feedforward_in(value: Any) -> str:
    """PEFT's ``feedforward_modules`` as unipeft's ``feedforward`` pattern."""
    if value is None or value == []:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple | set) and all(isinstance(v, str) for v in value):
        return "|".join(f".*{re.escape(v)}" for v in sorted(value))
    raise LoadError(
        f"this IA3 config has feedforward_modules={value!r}; PEFT writes a list of module "
        "names or a regex there"
    )


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    return {"feedforward": feedforward_in(config.get("feedforward_modules"))}


def _feedforward_sites(adapter: Adapter) -> list[ModuleSite]:
    cfg: Any = adapter.config
    return [
        s for s in adapter.sites if isinstance(s, ModuleSite) and is_feedforward(cfg.feedforward, s)
    ]


def _config_out(adapter: Adapter) -> dict[str, Any]:
    paths = sorted({s.path for s in _feedforward_sites(adapter)})
    return {
        "feedforward_modules": "|".join(re.escape(p) for p in paths) if paths else [],
        "init_ia3_weights": True,
    }


def _peft_shape(site: ModuleSite, feedforward: bool) -> tuple[int, ...]:
    """The shape PEFT gives ``ia3_l`` at ``site``."""
    ref = site.weight
    assert ref is not None
    n = ref.in_features if feedforward else site.features
    if ref.layout == "conv":
        return (1, n, *([1] * len(ref.kernel_size)))
    return (1, n) if feedforward else (n, 1)


def _state_in(peft: PeftSite) -> dict[str, Tensor]:
    site = peft.site
    if "l" not in peft.tensors:
        raise LoadError(f"module {site.path!r} has no ia3_l in the folder; the file is incomplete")
    tensor = peft.tensors["l"]
    feedforward = is_feedforward(peft.config.feedforward, site)
    want = _peft_shape(site, feedforward)
    if tuple(tensor.shape) != want:
        side = "input (a feedforward_modules entry)" if feedforward else "output"
        raise LoadError(
            f"module {site.path!r}: ia3_l has shape {tuple(tensor.shape)}, but PEFT's {side}-"
            f"side (IA)^3 on this module has {want}; the adapter was trained on a backbone of "
            "another size, or with other feedforward_modules"
        )
    return {"l": tensor.reshape(-1)}


def _state_out(adapter: Adapter, site: ModuleSite) -> dict[str, Tensor]:
    cfg: Any = adapter.config
    l = adapter.delta_at(site).l.detach()  # noqa: E741 - the paper's name
    return {"l": l.reshape(_peft_shape(site, is_feedforward(cfg.feedforward, site)))}


CODECS = (
    PeftCodec(
        method="ia3",
        absent_fields=frozenset({"layers_to_transform", "layers_pattern"}),
        peft_type="IA3",
        module_keys={"ia3_l": "l"},
        config_in=_config_in,
        config_out=_config_out,
        state_in=_state_in,
        state_out=_state_out,
        site_refusal=_refusal,
        known_fields=frozenset({"feedforward_modules", "init_ia3_weights"}),
    ),
)
