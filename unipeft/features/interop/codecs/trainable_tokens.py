"""PEFT's ``TRAINABLE_TOKENS`` as unipeft's ``trainable_tokens``.

A PEFT folder holds, per adapted embedding, ``trainable_tokens_delta`` ``(n, d)``: the
trained rows themselves (PEFT replaces the rows, it does not add to them), in the order of
the config's ``token_indices``; it maps one to one onto the delta's ``values``.
``token_indices`` and ``init_weights`` map to the fields of the same name. PEFT's tied
copies (an LM head sharing the table) are not saved; unipeft adapts the embedding only
(see :mod:`unipeft.methods.selective.trainable_tokens`). The module must be a whole
``nn.Embedding`` looked up by token ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from ....contract.errors import LoadError
from ....contract.sites import ModuleSite
from ....methods.selective.trainable_tokens import embedding_refusal
from ..codec import PeftCodec, PeftSite

if TYPE_CHECKING:
    from ....model import Adapter


def _config_in(config: dict[str, Any]) -> dict[str, Any]:
    indices = config.get("token_indices")
    if not isinstance(indices, list) or not indices:
        raise LoadError(
            f"this TRAINABLE_TOKENS adapter has token_indices={indices!r}; a list of the "
            "trained token ids is needed"
        )
    return {"token_indices": indices, "init_weights": bool(config.get("init_weights", True))}


def _config_out(adapter: Adapter) -> dict[str, Any]:
    cfg = adapter.config
    return {
        "token_indices": list(cfg.indices),  # type: ignore[attr-defined]
        "init_weights": cfg.init_weights,  # type: ignore[attr-defined]
    }


def _state_in(site: PeftSite) -> dict[str, Tensor]:
    parts = dict(site.tensors)
    return {"values": parts["values"]} if "values" in parts else {}


def _state_out(adapter: Adapter, site: ModuleSite) -> dict[str, Tensor]:
    return {"values": adapter.delta_at(site).values}  # type: ignore[dict-item]


CODECS = (
    PeftCodec(
        method="trainable_tokens",
        peft_type="TRAINABLE_TOKENS",
        module_keys={"trainable_tokens_delta": "values"},
        config_in=_config_in,
        config_out=_config_out,
        state_in=_state_in,
        state_out=_state_out,
        site_refusal=embedding_refusal,
        known_fields=frozenset({"token_indices"}),
        absent_fields=frozenset(
            {
                "fan_in_fan_out",
                "exclude_modules",
                "layers_to_transform",
                "layers_pattern",
                "modules_to_save",
            }
        ),
    ),
)
