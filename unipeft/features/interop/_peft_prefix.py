"""PEFT's PREFIX_TUNING folders for :mod:`unipeft.features.interop.peft`: reading one into a
``prefix_tuning`` plan and writing a ``prefix_tuning`` adapter as one.

The folder holds one tensor, ``prompt_embeddings`` ``(num_virtual_tokens,
num_layers·2·token_dim)``: per layer ``l``, columns ``[2l·D, (2l+1)·D)`` are the prefix's
keys and the next ``D`` its values (``D = token_dim``, the key/value width: on
grouped-query models the key/value heads only). PEFT writes the MLP's output there when it
trained with ``prefix_projection``, so an adapter read from PEFT has
``prefix_projection=False``, and unipeft writes its computed prefix the same way.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ...contract.errors import AdapterError, LoadError
from ...contract.sites import SequenceSite
from ...model import DeltaModel
from ._peft_common import _DECODER_SUFFIXES, WEIGHTS_FILE, LoadPlan, _sequence_site
from ._peft_save import _common_config


def text_kv_geometry(backbone: nn.Module, site: SequenceSite) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of the text model, as PEFT provisions its prefix."""
    config = getattr(site.insert, "config", None) or getattr(backbone, "config", None)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def first(*names: str) -> int:
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        raise LoadError(f"the backbone's config has none of {names}; PEFT needs them too")

    layers = first("num_hidden_layers", "n_layer", "num_layers")
    hidden = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head", "num_heads")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return int(layers), int(kv_heads), int(head_dim)


def check_prompt_folder(
    peft_type: str, scope: str, config: dict[str, Any], tensors: dict[str, Tensor]
) -> int:
    """What every prompt-learning PEFT folder must be: one token sequence (no encoder-decoder
    pair), exactly one tensor, ``prompt_embeddings``, and ``num_virtual_tokens`` an int >= 1,
    which is returned. ``scope`` says what unipeft converts, for the encoder-decoder error."""
    submodules = config.get("num_transformer_submodules")
    if submodules not in (None, 1):
        raise LoadError(
            f"this {peft_type} adapter has num_transformer_submodules={submodules} (an "
            f"encoder-decoder model); unipeft converts {scope} only"
        )
    extra = sorted(k for k in tensors if k != "prompt_embeddings")
    if "prompt_embeddings" not in tensors or extra:
        raise LoadError(
            f"a {peft_type} {WEIGHTS_FILE} holds exactly one tensor, 'prompt_embeddings'; "
            f"this one holds {sorted(tensors)}"
        )
    n = config.get("num_virtual_tokens")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LoadError(f"this {peft_type} config has num_virtual_tokens={n!r}; need an int >= 1")
    return n


def plan_prefix_tuning(
    backbone: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]
) -> LoadPlan:
    n = check_prompt_folder("PREFIX_TUNING", "prefixes of one decoder or encoder", config, tensors)
    site = _sequence_site(backbone)
    layers, kv_heads, head_dim = text_kv_geometry(backbone, site)
    for name, want in (
        ("num_layers", layers),
        ("token_dim", kv_heads * head_dim),
        ("num_attention_heads", kv_heads),
    ):
        got = config.get(name)
        if got is not None and got != want:
            raise LoadError(
                f"this PREFIX_TUNING config has {name}={got!r}, but this "
                f"{type(backbone).__name__} needs {want} (its layers and key/value heads); "
                "pass the model the adapter was trained on"
            )
    prefix = tensors["prompt_embeddings"]
    want = (n, layers * 2 * kv_heads * head_dim)
    if tuple(prefix.shape) != want:
        raise LoadError(
            f"tensor prompt_embeddings has shape {tuple(prefix.shape)} in the checkpoint but "
            f"this {type(backbone).__name__} needs {want} (num_virtual_tokens, num_layers·2·"
            "token_dim); the adapter was trained on a backbone of another size"
        )
    states = {site.name: {"kv": prefix}}
    return LoadPlan("prefix_tuning", {"num_tokens": n}, ["tokens"], [site], states, [])


def export_prefix_tuning(
    model: DeltaModel, adapter: Any, task_type: str | None
) -> tuple[dict[str, Any], dict[str, Tensor], list[str]]:
    sites = adapter.sites
    site = sites[0] if len(sites) == 1 else None
    if not isinstance(site, SequenceSite) or site.style != "hf_text":
        raise AdapterError(
            f"adapter {adapter.name!r} has prefixes at {[s.name for s in sites]}; PEFT's prefix "
            "tuning covers the layers of one Hugging Face text model (its tokens site) only"
        )
    backbone = model.base_model
    if task_type is None:
        name = type(backbone).__name__
        task_type = "CAUSAL_LM" if name.endswith(_DECODER_SUFFIXES) else "FEATURE_EXTRACTION"
    delta = adapter.delta_at(site)
    prefix = delta.flat().detach().clone()
    layers, kv_heads, head_dim = text_kv_geometry(backbone, site)
    config = _common_config(model, "PREFIX_TUNING", task_type)
    config.update(
        {
            "num_virtual_tokens": int(prefix.shape[0]),
            "token_dim": kv_heads * head_dim,
            "num_transformer_submodules": 1,
            "num_attention_heads": kv_heads,
            "num_layers": layers,
            "encoder_hidden_size": kv_heads * head_dim,
            "prefix_projection": False,
            "init_weights": None,
        }
    )
    return config, {"prompt_embeddings": prefix}, []
