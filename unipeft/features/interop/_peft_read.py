"""Reading a Hugging Face PEFT directory for :func:`unipeft.features.interop.peft.load`:
the files found and read (never a pickle), ``adapter_config.json`` checked against a schema
of the fields unipeft uses, every tensor a floating-point one."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from ...contract.errors import LoadError
from .._format import dtype_name, need_object, read_json, schema_message
from ..saving import live_config
from ._peft_common import (
    CONFIG_FILE,
    PICKLE_FILE,
    SUPPORTED_PEFT_TYPES,
    TMP_PREFIX,
    WEIGHTS_FILE,
    supported_text,
)
from .codecs import codec_for_type

_Names = list[StrictStr] | StrictStr | None
_Number = StrictInt | StrictFloat


class _Common(BaseModel):
    """The bookkeeping fields every PEFT config has. Fields unipeft does not use are let
    through (``extra="allow"``): the loader warns about those that are set."""

    model_config = ConfigDict(strict=True, extra="allow")
    peft_type: StrictStr
    task_type: StrictStr | None = None
    auto_mapping: dict[StrictStr, Any] | None = None
    base_model_name_or_path: StrictStr | None = None
    revision: StrictStr | None = None
    inference_mode: StrictBool = True
    peft_version: StrictStr | None = None


class _Modules(_Common):
    target_modules: _Names = None
    exclude_modules: _Names = None
    fan_in_fan_out: StrictBool = False


class _Lora(_Modules):
    r: Annotated[StrictInt, Field(ge=1)] = 8
    lora_alpha: _Number = 8
    lora_dropout: _Number | None = 0.0
    use_rslora: StrictBool = False
    init_lora_weights: StrictBool | StrictStr = True
    layers_to_transform: StrictInt | list[StrictInt] | None = None
    layers_pattern: _Names = None

    @field_validator("lora_alpha", "lora_dropout")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("a finite number is needed")
        return value


class _Ia3(_Modules):
    feedforward_modules: _Names = None
    init_ia3_weights: StrictBool = True


class _Prompt(_Common):
    num_virtual_tokens: Annotated[StrictInt, Field(ge=1)]
    token_dim: StrictInt | None = None
    num_transformer_submodules: StrictInt | None = None
    num_attention_heads: StrictInt | None = None
    num_layers: StrictInt | None = None
    prompt_tuning_init: StrictStr | None = None


_SCHEMAS: dict[str, type[_Common]] = {"LORA": _Lora, "IA3": _Ia3, "PROMPT_TUNING": _Prompt}
assert set(_SCHEMAS) == set(SUPPORTED_PEFT_TYPES)

_ACCEPTED = {
    "peft_type": ", ".join(SUPPORTED_PEFT_TYPES),
    "r": "an integer >= 1",
    "lora_alpha": "a number",
    "lora_dropout": "a number or null",
    "use_rslora": "true or false",
    "fan_in_fan_out": "true or false",
    "target_modules": "a list of module names, a regular expression or null",
    "exclude_modules": "a list of module names, a regular expression or null",
    "feedforward_modules": "a list of module names, a regular expression or null",
    "layers_to_transform": "an integer, a list of integers or null",
    "layers_pattern": "a string, a list of strings or null",
    "init_lora_weights": "true, false or the name of an initialisation",
    "num_virtual_tokens": "an integer >= 1",
    "inference_mode": "true or false",
}


def check_config(path: Path, config: Any) -> dict[str, Any]:
    """``config`` (the JSON of ``path``) checked against the schema of its ``peft_type``."""
    need_object(path, config, "PEFT adapter config")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str):
        raise LoadError(
            f"{path} is not a PEFT adapter config: field peft_type = "
            f"{peft_type!r} is refused (accepted: a string, one of "
            f"{', '.join(SUPPORTED_PEFT_TYPES)}); it has no 'peft_type' string"
        )
    codec = codec_for_type(peft_type)
    if peft_type.upper() not in _SCHEMAS and codec is None:
        raise LoadError(
            f"{path}: PEFT type {peft_type!r} (field peft_type) cannot be converted to unipeft: "
            f"unipeft.features.interop.peft supports {supported_text()}"
        )
    schema = _SCHEMAS.get(peft_type.upper(), _Modules)
    try:
        schema.model_validate(config)
    except ValidationError as exc:
        what = f"PEFT {peft_type.upper()} adapter config"
        raise LoadError(schema_message(path, config, exc, what, _ACCEPTED)) from None
    return config


def read(directory: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The config and tensors of a PEFT directory; never unpickles anything."""
    if not directory.is_dir():
        raise LoadError(
            f"{directory} is not a directory; pass the folder that PeftModel.save_pretrained() "
            "wrote (it holds adapter_config.json and adapter_model.safetensors)"
        )
    weights_path = directory / WEIGHTS_FILE
    # an export killed between its renames leaves its config in its temporary folder
    config_path = live_config(directory, WEIGHTS_FILE, CONFIG_FILE, TMP_PREFIX)
    if not config_path.is_file():
        nested = sorted(p.parent.name for p in directory.glob(f"*/{CONFIG_FILE}"))
        hint = (
            f"; PEFT writes adapters other than 'default' into subfolders named after them, "
            f"and {directory} has: {', '.join(nested)}: pass one of those"
            if nested
            else "; is it a directory written by PeftModel.save_pretrained()?"
        )
        raise LoadError(f"{config_path} does not exist{hint}")
    if not weights_path.is_file():
        if (directory / PICKLE_FILE).is_file():
            raise LoadError(
                f"{directory} holds only {PICKLE_FILE}, a pickle, and unipeft never unpickles "
                "files (loading one can run code). Re-save the adapter with "
                "PeftModel.save_pretrained(path, safe_serialization=True), the default"
            )
        raise LoadError(f"{weights_path} does not exist; the adapter directory is incomplete")
    config = check_config(config_path, read_json(config_path))
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoadError(
            f"{weights_path} is not a readable safetensors file ({exc}); it is truncated or "
            "corrupt: copy or save the adapter again"
        ) from None
    codec = codec_for_type(config["peft_type"])
    integer = codec.integer_parts if codec is not None else frozenset()
    suffixes = {k for k, part in codec.module_keys.items() if part in integer} if codec else set()
    whole = {k for k, part in codec.shared_keys.items() if part in integer} if codec else set()
    for key, tensor in sorted(tensors.items()):
        if key in whole or any(key.endswith("." + s) for s in suffixes):
            if tensor.is_floating_point() or tensor.is_complex():
                raise LoadError(
                    f"{weights_path}: tensor {key!r} is {dtype_name(tensor.dtype)}; PEFT's "
                    f"{codec.peft_type} stores integer indices there"  # type: ignore[union-attr]
                )
            continue
        if not tensor.is_floating_point():
            raise LoadError(
                f"{weights_path}: tensor {key!r} is {dtype_name(tensor.dtype)}; a PEFT adapter's "
                "tensors are floating-point (float32, float16, bfloat16...), and unipeft "
                "converts no integer tensor into one"
            )
    return config, tensors
