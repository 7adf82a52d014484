"""Read and write Hugging Face PEFT adapter directories.

PEFT's ``save_pretrained`` is the format most published adapters use, so unipeft reads it
(:func:`load`) and writes it (:func:`save`) for every method whose function both libraries
compute the same way. LoRA (rsLoRA, DoRA), prompt and prefix tuning are converted here; every other
type through its :class:`~unipeft.features.interop.codec.PeftCodec`
(:mod:`unipeft.features.interop.codecs`: (IA)^3, LoHa, LoKr, OFT, BOFT, VeRA, AdaLoRA...).

A PEFT directory holds ``adapter_config.json`` (``peft_type`` and the method's fields) and
``adapter_model.safetensors``, whose keys name modules by their path in the model that
``PeftModel`` wrapped, with PEFT's own prefix and without the adapter name::

    base_model.model.<module path>.lora_A.weight   (r, in[, *kernel])
    base_model.model.<module path>.lora_B.weight   (out, r[, 1, ...])
    base_model.model.<module path>.lora_magnitude_vector   (out,) with use_dora
    prompt_embeddings                              (num_virtual_tokens, token_dim)
    prompt_embeddings  (PREFIX_TUNING)             (num_virtual_tokens, num_layers·2·token_dim)

A PREFIX_TUNING ``prompt_embeddings`` row holds, per layer ``l``, the key (columns
``[2l·D, (2l+1)·D)``) and then the value of that prefix position (``D = token_dim``, the
key/value width); PEFT writes the MLP's output there when it trained with
``prefix_projection``, so unipeft reads it as ``prefix_projection=False`` and writes its
own computed prefix the same way.

The tensor keys, not ``target_modules``, decide where an adapter goes: they are what PEFT
filled, so ``target_modules``, ``layers_to_transform`` and ``exclude_modules`` are honoured
exactly. Only JSON and safetensors are read; a pickled ``adapter_model.bin`` is refused.
``adapter_config.json`` is checked against a schema of the fields unipeft uses (types,
ranges) and every tensor must be floating-point, with the shape its module needs.
Loading checks everything before it touches the backbone, so on any error the backbone is
exactly as it was.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ...contract.errors import AdapterError, ConfigError, LoadError
from ...contract.maps import generic_sites
from ...contract.plan import AdapterPlan
from ...contract.sites import ModuleSite, Site
from ...distributed.gather import on_main, sharding_engine, whole_deltas
from ...model import DeltaModel
from ...runtime.registry import registry
from . import _ptuning
from ._peft_common import (
    _FIELD_MAP,
    CONFIG_FILE,
    PREFIX,
    SUPPORTED_PEFT_TYPES,
    WEIGHTS_FILE,
    LoadPlan,
    _encoder_note,
    _sequence_site,
    supported_text,
)
from ._peft_prefix import check_prompt_folder, export_prefix_tuning, plan_prefix_tuning
from ._peft_read import read as _read
from ._peft_save import (
    _EXPORTERS,
    _all_conv1d,
    _common_config,
    _export_sites,
    _target_modules,
    _write,
)
from .codecs import codec_for_method, codec_for_type
from .codecs import registered_types as types

__all__ = ["CONFIG_FILE", "SUPPORTED_PEFT_TYPES", "WEIGHTS_FILE", "load", "save"]

PathLike = str | os.PathLike


_Plan = LoadPlan


# =================================================================================== load


def load(backbone: nn.Module, path: PathLike, *, adapter_name: str = "default") -> DeltaModel:
    """Load the PEFT adapter in directory ``path`` onto ``backbone``.

    ``backbone`` must be the model ``PeftModel`` wrapped (same class, same module paths),
    with its base weights. Pass a :class:`~unipeft.DeltaModel` instead to add the adapter
    to it under ``adapter_name``. On any error the backbone is left exactly as it was.
    """
    model = backbone if isinstance(backbone, DeltaModel) else None
    base = model.base_model if model is not None else backbone
    if model is not None:
        model.check_adapter_name(adapter_name)  # before reading anything
    reg = model.registry if model is not None else registry()
    config, tensors = _read(Path(path))
    plan = _plan(base, config, tensors)
    spec = reg.method(plan.method)
    try:
        cfg = spec.config.parse(spec.id, plan.config)
    except ConfigError as exc:
        raise LoadError(
            f"the PEFT config does not fit unipeft's {spec.id} ({_FIELD_MAP}): {exc}"
        ) from None
    for site in plan.sites:
        reason = spec.refusal(cfg, site)
        if reason is not None:
            raise LoadError(f"unipeft's {spec.id} cannot take this adapter: {reason}")
    smap = reg.pick_map(base).name
    adapter = AdapterPlan(spec, cfg, tuple(plan.sites), tuple(plan.targets), plan.states, smap)
    if model is None:
        model = DeltaModel(base)
    model.attach(adapter_name, adapter)  # leaves the model as it was if anything fails
    for note in plan.notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return model


def _plan(backbone: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]) -> _Plan:
    peft_type = config["peft_type"].upper()
    planners: dict[str, Callable[[nn.Module, dict[str, Any], dict[str, Tensor]], _Plan]] = {
        "LORA": _plan_lora,
        "PROMPT_TUNING": _plan_prompt_tuning,
        "PREFIX_TUNING": _plan_prefix_tuning,
        _ptuning.PEFT_TYPE: _ptuning.plan,
    }
    planner = planners.get(peft_type)
    codec = codec_for_type(peft_type) if planner is None else None
    if planner is None and codec is None:
        raise LoadError(
            f"PEFT type {config['peft_type']!r} cannot be converted to unipeft: "
            f"unipeft.features.interop.peft supports {supported_text()}"
        )
    if not tensors:
        raise LoadError(f"{WEIGHTS_FILE} holds no tensors; the adapter directory is incomplete")
    if codec is not None:
        from . import _peft_codec

        plan = _peft_codec.plan(
            backbone, codec, config, tensors,
            group=_group_keys, find_sites=_module_sites, projection=_projection,
        )  # fmt: skip
        known = _COMMON_KEYS | _peft_codec.SELECTION_KEYS | codec.known_fields
        plan.notes.extend(_unknown_fields(peft_type, config, known))
        return plan
    assert planner is not None
    plan = planner(backbone, config, tensors)
    plan.notes.extend(_unknown_fields(peft_type, config))
    return plan


# ----------------------------------------------------------------------------- config checks


def _is_set(value: Any) -> bool:
    """Whether a PEFT config field holds something other than its 'off' default."""
    return value not in (None, False, "", "none") and value != [] and value != {}


def _refuse(peft_type: str, config: dict[str, Any], refused: dict[str, str]) -> None:
    """Raise for the first field in ``refused`` that ``config`` sets."""
    for name, why in refused.items():
        if _is_set(config.get(name)):
            raise LoadError(
                f"this {peft_type} adapter sets {name}={config[name]!r}, which unipeft cannot "
                f"honour: {why}"
            )


_MODULES_TO_SAVE = (
    "the adapter carries full trained copies of those modules, and unipeft adapters hold "
    "deltas only. Train without modules_to_save, or load it with PEFT and merge it"
)

_LORA_REFUSED = {
    "bias": "the adapter changes the backbone's biases, which unipeft's lora leaves alone. "
    "Train with bias='none'",
    "lora_bias": "the adapter has a bias on lora_B, which unipeft's lora does not have. "
    "Train with lora_bias=False",
    "modules_to_save": _MODULES_TO_SAVE,
    "rank_pattern": "ranks differ between modules, and a unipeft lora adapter has one r. "
    "Train with one rank, or split the modules into several adapters",
    "alpha_pattern": "alphas differ between modules, and a unipeft lora adapter has one alpha. "
    "Train with one lora_alpha, or split the modules into several adapters",
    "trainable_token_indices": "the adapter trains embedding rows, which unipeft's lora does "
    "not. Train without trainable_token_indices",
    "target_parameters": "the adapter adapts bare parameters (such as MoE experts), and unipeft "
    "adapts modules. Target modules instead",
    "layer_replication": "the adapter duplicates layers of the backbone, which unipeft never "
    "restructures",
    "alora_invocation_tokens": "activated LoRA switches on at invocation tokens, which unipeft's "
    "lora does not do",
    "use_qalora": "QA-LoRA pools the input in groups, which unipeft's lora does not do",
    "use_bdlora": "BD-LoRA uses block-diagonal factors, which unipeft's lora does not have",
    "arrow_config": "Arrow routes between several LoRA experts, which unipeft's lora does not do",
    "kasa_config": "KaSA truncates the base weight and adds singular values, which unipeft's "
    "lora does not do",
    "monteclora_config": "MonteCLoRA samples its factors, which unipeft's lora does not do",
}

# keys every PEFT adapter config carries (bookkeeping, nothing about the adapter's maths)
_COMMON_KEYS = {
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
}

# initialisations that rewrite the backbone's weights: the adapter needs those weights
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")

_LORA_KNOWN = {
    *_LORA_REFUSED,
    "use_dora",  # read as unipeft's dora
    *_COMMON_KEYS,
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "fan_in_fan_out",  # LoRA's factors have the same layout either way
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "init_lora_weights",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "velora_config",  # a backward-pass memory saving; the forward is LoRA's
    "megatron_config",
    "megatron_core",
    "qalora_group_size",
    "runtime_config",
    "ensure_weight_tying",
}


def _check_lora_config(config: dict[str, Any]) -> None:
    for name, default in (("r", 8), ("lora_alpha", 8)):  # PEFT's defaults for absent fields
        config.setdefault(name, default)
    _refuse("LORA", config, _LORA_REFUSED)
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise LoadError(
            f"this LORA adapter was initialised with init_lora_weights={init!r}, which rewrites "
            "the backbone's weights, so the adapter only fits those rewritten weights. Convert "
            "it to a plain LoRA adapter first: PeftModel.save_pretrained(path, "
            "path_initial_model_for_weight_conversion=...)"
        )
    for name in ("r", "lora_alpha"):
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise LoadError(f"this LORA config has {name}={value!r}; PEFT writes a number there")


def _unknown_fields(
    peft_type: str, config: dict[str, Any], known: Iterable[str] | None = None
) -> list[str]:
    """Fields from newer PEFT versions: a warning, rather than refusing harmless defaults."""
    if known is None:
        known = {
            "LORA": _LORA_KNOWN,
            "PROMPT_TUNING": _PROMPT_KNOWN,
            "PREFIX_TUNING": _PREFIX_KNOWN,
            _ptuning.PEFT_TYPE: _ptuning.KNOWN_FIELDS,
        }[peft_type]
    known = set(known)
    unknown = sorted(n for n in config if n not in known and _is_set(config[n]))
    if not unknown:
        return []
    return [
        f"this {peft_type} config sets fields unipeft.features.interop.peft does not know: "
        f"{', '.join(unknown)} (written by PEFT {config.get('peft_version', '?')}). If they "
        "change what the adapter computes, the loaded adapter differs from PEFT's"
    ]


# ----------------------------------------------------------------------------- tensor keys

# substrings of a key PEFT writes beside plain adapter factors, most telling first
_KEY_HINTS = (
    ("lora_embedding_", "LoRA on an nn.Embedding; unipeft's lora adapts projections only"),
    ("lora_magnitude_vector", "a DoRA magnitude vector (use_dora)"),
    ("modules_to_save", "a full trained module copy (modules_to_save)"),
    ("trainable_tokens", "trained embedding rows (trainable_token_indices)"),
    (".bias", "a trained bias (bias='all' or 'lora_only', or lora_bias)"),
    (".weight", "a base-model weight saved with the adapter (PEFT's save_embedding_layers)"),
)


def _group_keys(
    peft_type: str, tensors: dict[str, Tensor], suffixes: dict[str, str]
) -> dict[str, dict[str, Tensor]]:
    """``{module path: {part: tensor}}`` from PEFT keys ``[prefix]<path>.<suffix>``."""
    groups: dict[str, dict[str, Tensor]] = {}
    unexpected: list[str] = []
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        part = next((s for s in suffixes if name.endswith("." + s)), None)
        if part is None:
            unexpected.append(key)
        else:
            groups.setdefault(name[: -len(part) - 1], {})[suffixes[part]] = tensor
    if unexpected:
        key, what = next(
            ((k, hint) for sub, hint in _KEY_HINTS for k in unexpected if sub in k),
            (unexpected[0], f"not part of a plain {peft_type} adapter"),
        )
        more = f" (and {len(unexpected) - 1} more such tensors)" if len(unexpected) > 1 else ""
        raise LoadError(
            f"{WEIGHTS_FILE} holds tensor {key!r}{more}, which is {what}; unipeft cannot load "
            f"it. A {peft_type} adapter it can load has only keys ending in "
            f"{', '.join('.' + s for s in suffixes)}"
        )
    return groups


def _module_sites(backbone: nn.Module, paths: Iterable[str], config: dict[str, Any]) -> list[Site]:
    """The generic site (named by module path) of each path, with a hint where one is missing."""
    by_name = {s.name: s for s in generic_sites(backbone)}
    out: list[Site] = []
    for path in paths:
        site = by_name.get(path)
        if site is None:
            raise LoadError(_missing_module(backbone, path, config))
        out.append(site)
    return out


def _missing_module(backbone: nn.Module, path: str, config: dict[str, Any]) -> str:
    mapping = config.get("auto_mapping") or {}
    saved_for = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    names = {n for n, _ in backbone.named_modules()}
    if saved_for and saved_for != type(backbone).__name__:
        hint = f"It was saved for a {saved_for}: pass a backbone of that class"
    else:
        hint = "Pass the model PeftModel wrapped, with the same configuration"
    head, _, rest = path.partition(".")
    outer = next((n for n in sorted(names) if n and f"{n}.{path}" in names), None)
    if rest in names:
        hint += f" (the paths start with {head!r}: a model that contains this one)"
    elif outer is not None:
        hint += f" (this backbone has the module as {outer}.{path}: pass backbone.{outer})"
    return (
        f"the adapter adapts module {path!r}, which this {type(backbone).__name__} does not "
        f"have; PEFT names modules by their path in the model it wrapped. {hint}."
    )


def _check_shape(path: str, tensor_name: str, got: Tensor, want: tuple[int, ...]) -> None:
    if tuple(got.shape) != want:
        raise LoadError(
            f"module {path!r}: tensor {tensor_name} has shape {tuple(got.shape)} in the "
            f"checkpoint but this backbone needs {want}; the adapter was trained on a backbone "
            "of another size (or with another rank)"
        )


def _check_numel(path: str, tensor_name: str, got: Tensor, n: int) -> None:
    """A vector stored in any shape with ``n`` elements along one dimension."""
    if got.numel() != n or max(got.shape, default=1) != n:
        raise LoadError(
            f"module {path!r}: tensor {tensor_name} has shape {tuple(got.shape)} in the "
            f"checkpoint but this backbone needs {n} values; the adapter was trained on a "
            "backbone of another size"
        )


def _projection(site: Site, path: str, method: str) -> ModuleSite:
    """``site`` as a whole-module projection, or an error that says why it is not one."""
    if not isinstance(site, ModuleSite) or site.weight is None or site.weight.layout == "mha_in":
        module = getattr(site, "module", None)
        raise LoadError(
            f"module {path!r} ({type(module).__name__}) is not a projection unipeft's {method} "
            "adapts: it converts adapters on nn.Linear, nn.Conv1d/2d/3d and GPT-2 Conv1D"
        )
    if site.host is not None:
        raise LoadError(
            f"module {path!r} is the out_proj of an nn.MultiheadAttention, whose forward does "
            "not call it as a module; PEFT and unipeft adapt it differently"
        )
    return site


# ----------------------------------------------------------------------------- LoRA


def _plan_lora(backbone: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]) -> _Plan:
    _check_lora_config(config)
    r = int(config["r"])
    dora = bool(config.get("use_dora"))
    suffixes = {"lora_A.weight": "A", "lora_B.weight": "B"}
    if dora:
        suffixes["lora_magnitude_vector"] = "magnitude"
    groups = _group_keys("LORA", tensors, suffixes)
    sites = _module_sites(backbone, groups, config)
    states: dict[str, dict[str, Tensor]] = {}
    for site in sites:
        proj = _projection(site, site.name, "lora")
        parts = groups[site.name]
        for part in ("A", "B", "magnitude") if dora else ("A", "B"):
            if part not in parts:
                key = "lora_magnitude_vector" if part == "magnitude" else f"lora_{part}.weight"
                raise LoadError(
                    f"module {site.name!r} has no {key} in {WEIGHTS_FILE}"
                    + (" although the config sets use_dora" if part == "magnitude" else "")
                    + "; the file is incomplete"
                )
        states[site.name] = _lora_state(proj, r, parts["A"], parts["B"])
        if dora:
            _check_numel(site.name, "lora_magnitude_vector", parts["magnitude"], site.features)
            states[site.name]["magnitude"] = parts["magnitude"].reshape(site.features)
    return _Plan(
        method="dora" if dora else "lora",
        config={
            "r": r,
            "alpha": float(config["lora_alpha"]),
            "use_rslora": bool(config.get("use_rslora", False)),
            "dropout": float(config.get("lora_dropout") or 0.0),
        },
        targets=[re.escape(s.name) for s in sites],
        sites=sites,
        states=states,
    )


def _lora_state(site: ModuleSite, r: int, a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """unipeft's ``A`` ``(r, in, *kernel)`` and ``B`` ``(out, r)`` from PEFT's factors.

    PEFT stores both as the weights of its own layers: ``nn.Linear`` for Linear and GPT-2
    Conv1D (``fan_in_fan_out`` only changes how it merges), and for a convolution a conv
    with the base kernel for A and a 1x1 conv for B.
    """
    assert site.weight is not None
    kernel = site.weight.kernel_size
    if site.weight.layout == "conv" and any(d != 1 for d in site.weight.conv_args["dilation"]):
        raise LoadError(
            f"module {site.name!r} is a dilated convolution; PEFT's lora_A ignores the "
            "dilation and unipeft's does not, so the two compute different functions"
        )
    want_a = (r, site.weight.in_features, *kernel)
    want_b = (site.features, r, *([1] * len(kernel)))
    _check_shape(site.name, "lora_A.weight", a, want_a)
    _check_shape(site.name, "lora_B.weight", b, want_b)
    return {"A": a, "B": b.reshape(site.features, r)}


# ----------------------------------------------------------------------------- prompt tuning

_PROMPT_KNOWN = {
    *_COMMON_KEYS,
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    "num_attention_heads",
    "num_layers",
    "modules_to_save",
    "prompt_tuning_init",
    "prompt_tuning_init_text",
    "tokenizer_name_or_path",
    "tokenizer_kwargs",
}


def _plan_prompt_tuning(
    backbone: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]
) -> _Plan:
    _refuse("PROMPT_TUNING", config, {"modules_to_save": _MODULES_TO_SAVE})
    n = check_prompt_folder("PROMPT_TUNING", "prompts of one token sequence", config, tensors)
    site = _sequence_site(backbone)
    prompt = tensors["prompt_embeddings"]
    _check_shape(site.name, "prompt_embeddings", prompt, (n, site.features))
    notes = [_encoder_note(backbone, site, "loads")] if site.index != 0 else []
    states = {site.name: {"prompt": prompt}}
    return _Plan("prompt_tuning", {"num_tokens": n}, ["tokens"], [site], states, notes)


# ----------------------------------------------------------------------------- prefix tuning

_PREFIX_KNOWN = {
    *_PROMPT_KNOWN,
    "encoder_hidden_size",
    "prefix_projection",  # PEFT saves the projected prefix: the same tensor either way
    "init_weights",
}


def _plan_prefix_tuning(
    backbone: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor]
) -> _Plan:
    _refuse("PREFIX_TUNING", config, {"modules_to_save": _MODULES_TO_SAVE})
    return plan_prefix_tuning(backbone, config, tensors)


# =================================================================================== save


def save(
    model: DeltaModel,
    path: PathLike,
    adapter_name: str = "default",
    *,
    task_type: str | None = None,
) -> None:
    """Write adapter ``adapter_name`` of ``model`` as a PEFT directory.

    ``peft.PeftModel.from_pretrained(backbone, path)`` then loads it onto the same backbone.
    ``task_type`` is written to the config; by default ``None`` for LoRA and (IA)^3, and for
    prompt and prefix tuning ``"CAUSAL_LM"`` on ``*ForCausalLM`` / ``*LMHeadModel`` backbones, else
    ``"FEATURE_EXTRACTION"`` (PEFT needs one to insert the prompts).
    """
    if not isinstance(model, DeltaModel):
        raise AdapterError(
            f"save() takes the DeltaModel that holds the adapter, got {type(model).__name__}"
        )
    adapter = model.get_adapter(adapter_name)
    exporter = _EXPORTERS.get(adapter.method.id) or _ptuning.EXPORTERS.get(adapter.method.id)
    if adapter.method.id == "prefix_tuning":
        exporter = export_prefix_tuning
    codec = codec_for_method(adapter.method.id) if exporter is None else None
    if exporter is None and codec is None:
        methods = sorted(
            {
                *_EXPORTERS,
                *_ptuning.EXPORTERS,
                "prefix_tuning",
                *(c.method for c in map(codec_for_type, types()) if c),
            }
        )
        raise AdapterError(
            f"adapter {adapter_name!r} uses method {adapter.method.id!r}, which PEFT cannot "
            f"load as an equivalent adapter; unipeft.features.interop.peft exports "
            f"{', '.join(methods)}"
        )
    engine = sharding_engine(model)
    with whole_deltas(model):  # sharded (FSDP, ZeRO-3): every rank gathers, rank 0 writes
        if codec is not None:
            from . import _peft_codec

            config, tensors = _peft_codec.export(
                model, adapter, codec, whole_sites=_export_sites,
                common=_common_config(model, codec.peft_type, task_type),
                target_modules=_target_modules, fan_in_fan_out=_all_conv1d,
            )  # fmt: skip
            notes: list[str] = []
        else:
            assert exporter is not None
            config, tensors, notes = exporter(model, adapter, task_type)
        tensors = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}
    on_main(lambda: _write(Path(path), config, tensors), collective=engine is not None)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
