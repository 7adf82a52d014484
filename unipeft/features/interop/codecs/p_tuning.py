"""PEFT's ``P_TUNING`` as unipeft's ``p_tuning``: the type's registration.

A P_TUNING folder holds one tensor, ``prompt_embeddings`` ``(num_virtual_tokens,
token_dim)`` (the prompt encoder's outputs), not tensors keyed by module, so it is converted
as a whole by :mod:`unipeft.features.interop._ptuning` (``plan`` and ``export``), which
:mod:`unipeft.features.interop.peft` dispatches to. This codec registers the type, so that
the reader accepts its config and the type is listed; its per-module functions are never
reached and say so if called.
"""

from __future__ import annotations

from typing import Any, NoReturn

from ....contract.errors import LoadError
from ..codec import PeftCodec


def _not_per_module(*_: Any) -> NoReturn:
    raise LoadError(
        "P_TUNING adapters are converted by unipeft.features.interop.peft.load/save as a whole "
        "(one 'prompt_embeddings' tensor, see unipeft.features.interop._ptuning), not module by "
        "module"
    )


CODECS = (
    PeftCodec(
        method="p_tuning",
        peft_type="P_TUNING",
        module_keys={},
        config_in=_not_per_module,
        config_out=_not_per_module,
        state_in=_not_per_module,
        state_out=_not_per_module,
        known_fields=frozenset(
            {
                "num_virtual_tokens",
                "token_dim",
                "num_transformer_submodules",
                "num_attention_heads",
                "num_layers",
                "encoder_reparameterization_type",
                "encoder_hidden_size",
                "encoder_num_layers",
                "encoder_dropout",
            }
        ),
    ),
)
