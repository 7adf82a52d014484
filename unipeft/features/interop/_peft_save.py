"""Writing a unipeft adapter as a Hugging Face PEFT directory, for
:func:`unipeft.features.interop.peft.save`: one exporter per method (config, tensors, notes) and the
crash-safe write of the directory."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...contract.errors import AdapterError
from ...contract.sites import ModuleSite, SequenceSite
from ...model import Adapter, DeltaModel
from .. import saving
from ._peft_common import (
    _DECODER_SUFFIXES,
    CONFIG_FILE,
    PREFIX,
    TMP_PREFIX,
    WEIGHTS_FILE,
    _encoder_note,
)

_Export = tuple[dict[str, Any], dict[str, Tensor], list[str]]


def _common_config(model: DeltaModel, peft_type: str, task_type: str | None) -> dict[str, Any]:
    backbone = model.base_model
    return {
        "peft_type": peft_type,
        "task_type": task_type,
        "auto_mapping": None
        if task_type
        else {
            "base_model_class": type(backbone).__name__,
            "parent_library": type(backbone).__module__,
        },
        "base_model_name_or_path": getattr(backbone, "name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "modules_to_save": None,
    }


def _export_sites(adapter: Adapter, method: str) -> list[ModuleSite]:
    """The adapter's sites, each a whole projection module that PEFT can name."""
    out: list[ModuleSite] = []
    for site in adapter.sites:
        if (
            not isinstance(site, ModuleSite)
            or site.weight is None
            or site.entry is not None
            or site.weight.layout == "mha_in"
        ):
            raise AdapterError(
                f"adapter {adapter.name!r} has site {site.name!r}, which is not a whole "
                f"projection module; PEFT's {method} can only name whole modules. Target "
                "unfused projections (or the whole fused module by its name) to export"
            )
        if site.out_slice is not None:
            raise AdapterError(
                f"adapter {adapter.name!r} has site {site.name!r}, a slice of the fused "
                f"projection {site.path!r}; PEFT cannot express a slice. To export, train "
                f'the adapter on whole modules, e.g. targets=[r"{re.escape(site.path)}"]'
            )
        if site.host is not None:
            raise AdapterError(
                f"adapter {adapter.name!r} has site {site.name!r}, the out_proj of an "
                "nn.MultiheadAttention, which PEFT does not adapt as a module of its own"
            )
        out.append(site)
    return out


def _all_conv1d(sites: list[ModuleSite]) -> bool:
    """PEFT's ``fan_in_fan_out``: true for GPT-2 Conv1D, whose weight is ``(in, out)``."""
    return all(s.weight is not None and s.weight.layout == "conv1d_t" for s in sites)


def _target_modules(backbone: nn.Module, paths: list[str]) -> list[str] | str:
    """Module paths in the form PEFT matches exactly the modules given.

    PEFT matches a list entry ``t`` against every module name ``n == t`` or ending in
    ``"." + t``, so a list could also catch a nested module; then an anchored regex (which
    PEFT full-matches) is written instead.
    """
    wanted = set(paths)
    names = [n for n, _ in backbone.named_modules()]
    caught = {n for n in names if n in wanted or any(n.endswith("." + t) for t in paths)}
    if caught == wanted:
        return sorted(paths)
    return "|".join(re.escape(p) for p in sorted(paths))


def _export_lora(model: DeltaModel, adapter: Adapter, task_type: str | None) -> _Export:
    """LoRA, DoRA (``use_dora``), and LoRA started by PiSSA/OLoRA as the plain LoRA of rank
    ``2r`` it equals: ``[B, −B₀] [A; A₀]`` with alpha doubled (``√2``× with rsLoRA), so that
    the scale ``alpha / r`` is unchanged."""
    sites = _export_sites(adapter, adapter.method.id)
    dora = adapter.method.id == "dora"
    cfg = adapter.config
    residual = getattr(cfg, "init", None) in ("pissa", "olora")
    tensors: dict[str, Tensor] = {}
    for site in sites:
        assert site.weight is not None
        if site.weight.layout == "conv" and any(d != 1 for d in site.weight.conv_args["dilation"]):
            raise AdapterError(
                f"site {site.name!r} is a dilated convolution; PEFT's lora_A ignores the "
                "dilation, so it would compute a different function"
            )
        delta = adapter.delta_at(site)
        a, b = delta.A.detach(), delta.B.detach()
        if residual:
            a = torch.cat([a, delta.A0.detach().to(a.dtype)])  # type: ignore[operator]
            b = torch.cat([b, -delta.B0.detach().to(b.dtype)], dim=1)  # type: ignore[operator]
        ones = [1] * len(site.weight.kernel_size)
        tensors[f"{PREFIX}{site.path}.lora_A.weight"] = a
        tensors[f"{PREFIX}{site.path}.lora_B.weight"] = b.reshape(*b.shape, *ones)
        if dora:
            m = delta.magnitude.detach()  # type: ignore[union-attr]
            shape = (1, m.shape[0], *ones) if site.weight.layout == "conv" else (m.shape[0],)
            tensors[f"{PREFIX}{site.path}.lora_magnitude_vector"] = m.reshape(shape)
    alpha = cfg.alpha  # type: ignore[attr-defined]
    r = cfg.r  # type: ignore[attr-defined]
    if residual:
        r, alpha = 2 * r, alpha * (2**0.5 if cfg.use_rslora else 2)  # type: ignore[attr-defined]
    config = _common_config(model, "LORA", task_type)
    config.update(
        {
            "r": r,
            "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "use_rslora": cfg.use_rslora,  # type: ignore[attr-defined]
            "lora_dropout": cfg.dropout,  # type: ignore[attr-defined]
            "target_modules": _target_modules(model.base_model, [s.path for s in sites]),
            "fan_in_fan_out": _all_conv1d(sites),
            "bias": "none",
            "init_lora_weights": True,
            "use_dora": dora,
            "rank_pattern": {},
            "alpha_pattern": {},
            "layers_to_transform": None,
            "layers_pattern": None,
        }
    )
    return config, tensors, []


def _export_prompt_tuning(model: DeltaModel, adapter: Adapter, task_type: str | None) -> _Export:
    sites = adapter.sites
    site = sites[0] if len(sites) == 1 else None
    if not isinstance(site, SequenceSite) or site.style != "hf_text":
        raise AdapterError(
            f"adapter {adapter.name!r} has soft tokens at {[s.name for s in sites]}; PEFT prompt "
            "tuning exports one Hugging Face text token sequence only"
        )
    backbone = model.base_model
    if task_type is None:
        name = type(backbone).__name__
        task_type = "CAUSAL_LM" if name.endswith(_DECODER_SUFFIXES) else "FEATURE_EXTRACTION"
    prompt = adapter.delta_at(site).prompt.detach()
    hf_config = getattr(backbone, "config", None)
    config = _common_config(model, "PROMPT_TUNING", task_type)
    config.update(
        {
            "num_virtual_tokens": int(prompt.shape[0]),
            "token_dim": int(prompt.shape[1]),
            "num_transformer_submodules": 1,
            "num_attention_heads": getattr(hf_config, "num_attention_heads", None),
            "num_layers": getattr(hf_config, "num_hidden_layers", None),
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None,
        }
    )
    notes = [_encoder_note(backbone, site, "is written")] if site.index != 0 else []
    return config, {"prompt_embeddings": prompt}, notes


_EXPORTERS: dict[str, Callable[[DeltaModel, Adapter, str | None], _Export]] = {
    "lora": _export_lora,
    "dora": _export_lora,
    "prompt_tuning": _export_prompt_tuning,
}


def _write(directory: Path, config: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Write the two files crash-safely, as unipeft's own saves are written
    (:func:`unipeft.features.saving.write_pair`): a kill at any instant leaves the old pair
    or the new one, and the next export removes what a killed one left behind."""
    cpu = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    text = json.dumps(config, indent=2, sort_keys=True).encode("utf-8")
    saving.write_pair(
        directory, cpu, {"format": "pt"}, lambda _checksum: text,
        weights_name=WEIGHTS_FILE, config_name=CONFIG_FILE, prefix=TMP_PREFIX,
    )  # fmt: skip
