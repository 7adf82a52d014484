"""What both directions of :mod:`unipeft.features.interop.peft` share: the file names and key prefix
of a PEFT directory, where PEFT's prompt tuning puts its tokens, and the shape of PEFT's
(IA)^3 vector."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ...contract.errors import LoadError
from ...contract.sites import SequenceSite, Site
from ...runtime.registry import registry
from ...runtime.targets import all_sites

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
TMP_PREFIX = ".unipeft-peft-"  # the exporter's temporary folders, beside the files
PREFIX = "base_model.model."
SUPPORTED_PEFT_TYPES = ("LORA", "IA3", "PROMPT_TUNING")
_SUPPORTED_TEXT = "LORA (with use_dora), IA3 and PROMPT_TUNING"
_DECODER_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_FIELD_MAP = (
    "PEFT's r, lora_alpha, lora_dropout, use_rslora and num_virtual_tokens become unipeft's "
    "r, alpha, dropout, use_rslora and num_tokens"
)


@dataclass
class LoadPlan:
    """Everything a load needs, computed and checked before the backbone is touched."""

    method: str
    config: dict[str, Any]
    targets: list[str]
    sites: list[Site]
    states: dict[str, dict[str, Tensor]]  # site name (or SHARED) -> the module's state dict
    notes: list[str] = field(default_factory=list)  # UserWarnings to emit on success


def supported_text() -> str:
    """The PEFT types unipeft converts, for messages."""
    from .codecs import registered_types

    extra = [t for t in registered_types() if t not in SUPPORTED_PEFT_TYPES]
    return ", ".join(["LORA", "IA3", "PROMPT_TUNING", *extra])


_ENCODER_NOTE = (
    "PEFT prepends its soft tokens at position 0 (before {cls}) and keeps them in its "
    "outputs; on this {cls_name} unipeft inserts them at index {index} (after the first "
    "token) and strips them from the outputs. The adapter {verb}, but its outputs differ "
    "from PEFT's by design."
)


def _sequence_site(backbone: nn.Module) -> SequenceSite:
    """The one Hugging Face text token sequence, where PEFT's prompt tuning puts its tokens."""
    sites = all_sites(backbone, registry().pick_map(backbone))
    found = [s for s in sites if isinstance(s, SequenceSite)]
    text = [s for s in found if s.style == "hf_text"]
    if len(text) != 1:
        what = f"{len(text)} Hugging Face text token sequences" if text else "no text sequence"
        raise LoadError(
            f"PEFT prompt tuning needs one Hugging Face text token sequence, and unipeft finds "
            f"{what} on {type(backbone).__name__}; use a transformers text model that a "
            "unipeft structure map recognises (BERT-, GPT-2- or Llama-like)"
        )
    return text[0]


def _encoder_note(backbone: nn.Module, site: SequenceSite, verb: str) -> str:
    return _ENCODER_NOTE.format(
        cls="[CLS]", cls_name=type(backbone).__name__, index=site.index, verb=verb
    )
