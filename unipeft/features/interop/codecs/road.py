"""PEFT's ``ROAD`` as unipeft's ``road``.

A PEFT RoAd folder holds, per adapted module, ``road_theta`` and ``road_alpha``, flat
vectors of ``d_out / 2``, ``d_out`` or ``2 · d_out`` entries for the variants road_1,
road_2 and road_4: exactly unipeft's ``theta`` and ``alpha``. Config: ``variant`` and
``group_size`` map by name, ``init_weights`` True/False to ``init`` "identity"/"random"
(the init only matters before training: the tensors are loaded over it). PEFT's RoAd adapts
``nn.Linear`` modules only (not GPT-2's Conv1D). Its mixed-batch path (``adapter_names``)
needs nothing in the folder: unipeft's mixed batches run each adapter on its own samples.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ....contract.sites import ModuleSite
from ..codec import PeftCodec, PeftSite

if TYPE_CHECKING:
    from ....model import Adapter


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "variant": config.get("variant", "road_1"),
        "group_size": config.get("group_size", 64),
        "init": "identity" if config.get("init_weights", True) else "random",
    }


def _config_out(adapter: Adapter) -> dict[str, Any]:
    cfg = adapter.config
    return {
        "variant": cfg.variant,  # type: ignore[attr-defined]
        "group_size": cfg.group_size,  # type: ignore[attr-defined]
        "init_weights": cfg.init == "identity",  # type: ignore[attr-defined]
    }


def _state_in(site: PeftSite) -> dict[str, Tensor]:
    return {k: v for k, v in site.tensors.items() if k in ("theta", "alpha")}


def _state_out(adapter: Adapter, site: ModuleSite) -> dict[str, Tensor]:
    delta = adapter.delta_at(site)
    return {"theta": delta.theta, "alpha": delta.alpha}  # type: ignore[dict-item]


def _site_refusal(site: ModuleSite) -> str | None:
    """PEFT's RoAd adapts whole ``nn.Linear`` modules, called as modules."""
    if not isinstance(site.module, nn.Linear):
        return (
            f"module {site.path!r} ({type(site.module).__name__}) is not an nn.Linear, the only "
            "module PEFT's RoAd adapts (GPT-2's Conv1D and convolutions are not)"
        )
    if site.entry is not None or site.out_slice is not None:
        return f"site {site.name!r} is not a whole module PEFT can name"
    if site.host is not None:
        return (
            f"module {site.path!r} is the out_proj of an nn.MultiheadAttention, whose forward "
            "does not call it as a module, so PEFT's RoAd would not run there"
        )
    return None


CODECS = (
    PeftCodec(
        method="road",
        absent_fields=frozenset(
            {"fan_in_fan_out", "exclude_modules", "layers_to_transform", "layers_pattern"}
        ),
        peft_type="ROAD",
        module_keys={"road_theta": "theta", "road_alpha": "alpha"},
        config_in=_config_in,
        config_out=_config_out,
        state_in=_state_in,
        state_out=_state_out,
        site_refusal=_site_refusal,
        known_fields=frozenset({"variant", "group_size", "init_weights"}),
    ),
)
