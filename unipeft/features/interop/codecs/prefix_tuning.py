"""PEFT's ``PREFIX_TUNING`` as unipeft's ``prefix_tuning``: the type's registration.

A PREFIX_TUNING folder holds one tensor, ``prompt_embeddings`` ``(num_virtual_tokens,
num_layers·2·token_dim)``, not tensors keyed by module, so
:mod:`unipeft.features.interop.peft` converts it itself (``_plan_prefix_tuning`` and
``_export_prefix_tuning``), as it does PROMPT_TUNING. This codec registers the type, so
that the reader accepts its config and the type is listed; its per-module functions are
never reached and say so if called.
"""

from __future__ import annotations

from typing import Any, NoReturn

from ....contract.errors import LoadError
from ..codec import PeftCodec


def _not_per_module(*_: Any) -> NoReturn:
    raise LoadError(
        "PREFIX_TUNING adapters are converted by unipeft.features.interop.peft.load/save as a "
        "whole (one 'prompt_embeddings' tensor), not module by module"
    )


_KNOWN = (
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    "num_attention_heads",
    "num_layers",
    "encoder_hidden_size",
    "prefix_projection",
    "init_weights",
)

CODECS = (
    PeftCodec(
        method="prefix_tuning",
        peft_type="PREFIX_TUNING",
        module_keys={},
        config_in=_not_per_module,
        config_out=_not_per_module,
        state_in=_not_per_module,
        state_out=_not_per_module,
        known_fields=frozenset(_KNOWN),
    ),
)
