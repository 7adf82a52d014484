"""PEFT's P_TUNING (prompt encoder) folders in and out, as unipeft's ``p_tuning``.

A PEFT P_TUNING folder never holds the encoder: ``save_pretrained`` runs it once and stores
its outputs, ``prompt_embeddings`` of shape ``(num_virtual_tokens, token_dim)``, and
``PeftModel.from_pretrained`` (``is_trainable=False``) uses them as the soft tokens
directly. So a loaded adapter is ``p_tuning`` with ``inference_mode=True`` (the encoder's
config fields kept), and a saved one writes the encoder's outputs, computed in eval mode.
Like PROMPT_TUNING, the tokens sit in the one Hugging Face text token sequence.

:func:`plan` (load) and :func:`export` (save) have the signatures of
:mod:`unipeft.features.interop.peft`'s own planners and exporters; ``peft.py`` dispatches
``peft_type == "P_TUNING"`` to :func:`plan` and method ``p_tuning`` to :func:`export`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...contract.errors import AdapterError, LoadError
from ...contract.sites import SequenceSite
from ...model import Adapter, DeltaModel
from ._peft_common import (
    _DECODER_SUFFIXES,
    WEIGHTS_FILE,
    LoadPlan,
    _encoder_note,
    _sequence_site,
)
from ._peft_save import _common_config

__all__ = ["EXPORTERS", "KNOWN_FIELDS", "PEFT_TYPE", "export", "plan"]

PEFT_TYPE = "P_TUNING"
METHOD = "p_tuning"

KNOWN_FIELDS = frozenset(
    {
        # bookkeeping every PEFT config carries
        "task_type",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        # prompt learning
        "num_virtual_tokens",
        "token_dim",
        "num_transformer_submodules",
        "num_attention_heads",
        "num_layers",
        "modules_to_save",
        # the prompt encoder
        "encoder_reparameterization_type",
        "encoder_hidden_size",
        "encoder_num_layers",
        "encoder_dropout",
    }
)

_ENCODERS = {"MLP": "mlp", "LSTM": "lstm"}

_NO_ENCODER_NOTE = (
    "PEFT stores a P_TUNING adapter's encoder outputs only, never the encoder: the folder "
    "loads in PEFT for inference (PeftModel.from_pretrained with is_trainable=False, the "
    "default) with the same soft tokens; is_trainable=True would put a new random encoder on "
    "top of them"
)


def _set(value: Any) -> bool:
    return value not in (None, False, "", "none") and value != [] and value != {}


def _int_field(config: dict[str, Any], name: str, default: int | None, low: int) -> int | None:
    value = config.get(name, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise LoadError(f"this {PEFT_TYPE} config has {name}={value!r}; need an int >= {low}")
    return value


def plan(backbone: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]) -> LoadPlan:
    """The load plan of a PEFT P_TUNING folder (config and tensors as read)."""
    if _set(config.get("modules_to_save")):
        raise LoadError(
            f"this {PEFT_TYPE} adapter sets modules_to_save={config['modules_to_save']!r}, "
            "which unipeft cannot honour: the adapter carries full trained copies of those "
            "modules, and unipeft adapters hold deltas only"
        )
    submodules = config.get("num_transformer_submodules")
    if submodules not in (None, 1):
        raise LoadError(
            f"this {PEFT_TYPE} adapter has num_transformer_submodules={submodules} (an "
            "encoder-decoder model); unipeft converts prompts of one token sequence only"
        )
    if sorted(tensors) != ["prompt_embeddings"]:
        raise LoadError(
            f"a {PEFT_TYPE} {WEIGHTS_FILE} holds exactly one tensor, 'prompt_embeddings' (the "
            f"prompt encoder's outputs); this one holds {sorted(tensors)}"
        )
    kind = config.get("encoder_reparameterization_type") or "MLP"
    encoder = _ENCODERS.get(str(kind).upper())
    if encoder is None:
        raise LoadError(
            f"this {PEFT_TYPE} config has encoder_reparameterization_type={kind!r}; PEFT "
            f"writes one of {sorted(_ENCODERS)}"
        )
    n = _int_field(config, "num_virtual_tokens", None, 1)
    if n is None:
        raise LoadError(f"this {PEFT_TYPE} config has no num_virtual_tokens; PEFT writes one")
    dropout = config.get("encoder_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float):
        raise LoadError(f"this {PEFT_TYPE} config has encoder_dropout={dropout!r}; need a number")
    site = _sequence_site(backbone)
    prompt = tensors["prompt_embeddings"]
    want = (n, site.features)
    if tuple(prompt.shape) != want:
        raise LoadError(
            f"tensor 'prompt_embeddings' for {site.name!r} has shape {tuple(prompt.shape)}, "
            f"but num_virtual_tokens and the model's width need {want}"
        )
    unipeft_config = {
        "num_tokens": n,
        "encoder": encoder,
        "encoder_hidden_size": _int_field(config, "encoder_hidden_size", None, 1),
        "encoder_num_layers": _int_field(config, "encoder_num_layers", 2, 1),
        "encoder_dropout": float(dropout),
        "inference_mode": True,
    }
    notes = [_encoder_note(backbone, site, "loads")] if site.index != 0 else []
    # fields this reader does not know are reported by peft.py (KNOWN_FIELDS)
    states = {site.name: {"embedding": prompt}}
    return LoadPlan(METHOD, unipeft_config, ["tokens"], [site], states, notes)


def export(
    model: DeltaModel, adapter: Adapter, task_type: str | None
) -> tuple[dict[str, Any], dict[str, Tensor], list[str]]:
    """``(adapter_config.json, tensors, notes)`` of a ``p_tuning`` adapter as PEFT P_TUNING."""
    sites = adapter.sites
    site = sites[0] if len(sites) == 1 else None
    if not isinstance(site, SequenceSite) or site.style != "hf_text":
        raise AdapterError(
            f"adapter {adapter.name!r} has soft tokens at {[s.name for s in sites]}; PEFT "
            "P_TUNING exports one Hugging Face text token sequence only (target 'tokens')"
        )
    backbone = model.base_model
    if task_type is None:
        name = type(backbone).__name__
        task_type = "CAUSAL_LM" if name.endswith(_DECODER_SUFFIXES) else "FEATURE_EXTRACTION"
    delta = adapter.delta_at(site)
    training = delta.training
    delta.eval()  # the outputs PEFT stores are the encoder's without dropout
    try:
        with torch.no_grad():
            prompt = delta.prompts().detach().contiguous()
    finally:
        delta.train(training)
    cfg = adapter.config
    hf_config = getattr(backbone, "config", None)
    config = _common_config(model, PEFT_TYPE, task_type)
    config.update(
        {
            "num_virtual_tokens": int(prompt.shape[0]),
            "token_dim": int(prompt.shape[1]),
            "num_transformer_submodules": 1,
            "num_attention_heads": getattr(hf_config, "num_attention_heads", None),
            "num_layers": getattr(hf_config, "num_hidden_layers", None),
            "encoder_reparameterization_type": cfg.encoder.upper(),
            "encoder_hidden_size": cfg.encoder_hidden_size or int(prompt.shape[1]),
            "encoder_num_layers": cfg.encoder_num_layers,
            "encoder_dropout": cfg.encoder_dropout,
        }
    )
    notes = [_encoder_note(backbone, site, "is written")] if site.index != 0 else []
    if not cfg.inference_mode:
        notes.append(_NO_ENCODER_NOTE)
    return config, {"prompt_embeddings": prompt}, notes


EXPORTERS = {METHOD: export}
"""Method id -> exporter, to merge into ``peft.py``'s exporters."""
