"""Quantized bases: bitsandbytes 4-bit and 8-bit layers and torchao weights under unipeft.

A quantized ``nn.Linear`` (bitsandbytes ``Linear4bit`` with NF4 or FP4 codes and optional
double quantization, ``Linear8bitLt``; an ``nn.Linear`` whose weight torchao's ``quantize_``
turned into an ``Int8Tensor`` or ``Float8Tensor``) is a projection site like any other. What
this module adds is a :class:`~unipeft.contract.sites.WeightCodec` per format, registered with
the contract when unipeft is imported, so that

- methods that need the weight itself (DoRA's norms, (IA)³'s input side, OFT...) read it
  *dequantized* through :meth:`ModuleSite.weight_views`;
- new delta parameters take the layer's compute dtype, not the packed storage's;
- ``merge()`` dequantizes, folds the deltas in, re-quantizes in the layer's own format and
  reports the re-quantization error; ``unmerge()`` puts the original quantized parameter
  (and the state the layer keeps beside it) back, so the original bytes return exactly.

The public helpers are :func:`is_quantized`, :func:`dequantized_weight`,
:func:`prepare_quantized`, :func:`dequantize_model`, :func:`merge_errors` and
:func:`quantize_linears` (bitsandbytes layers for a model built in memory).
bitsandbytes and torchao are imported only inside functions, and only once a tensor of
theirs exists, so ``import unipeft`` never needs them.
"""

from __future__ import annotations

import copy
import sys
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from .contract.errors import ConfigError
from .contract.sites import register_weight_codec, weight_codec

__all__ = [
    "QuantizedMergeWarning",
    "dequantize_model",
    "dequantized_weight",
    "is_quantized",
    "merge_errors",
    "prepare_quantized",
    "quantize_linears",
]


class QuantizedMergeWarning(UserWarning):
    """``merge()`` re-quantized a layer: the merged weights differ from ``W + ΔW`` by the
    error the warning states (:func:`merge_errors` gives it per layer)."""


# --------------------------------------------------------------------------- bitsandbytes


def _bnb() -> Any:
    """bitsandbytes, if something has imported it already (a bnb tensor cannot exist
    otherwise), else ``None``: claiming a weight never imports the library."""
    module = sys.modules.get("bitsandbytes")
    return module if hasattr(module, "nn") else None


class _Bnb4bit:
    name = "bitsandbytes Linear4bit"

    def claims(self, module: nn.Module | None, weight: Tensor) -> bool:
        bnb = _bnb()
        if bnb is None:
            return False
        if isinstance(weight, bnb.nn.Params4bit):
            return True
        # FSDP and other wrappers may turn the parameter into a plain tensor of the packed
        # storage; the layer keeps its quantization state, as bitsandbytes itself relies on
        return (
            isinstance(module, bnb.nn.Linear4bit)
            and getattr(module, "quant_state", None) is not None
        )

    def _state(self, module: nn.Module | None, weight: Tensor) -> Any:
        qs = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
        if qs is None:
            raise RuntimeError(
                f"{type(module).__name__}: the 4-bit weight has no quantization state (it was "
                "never quantized: move the layer to its device with .to(device) first)"
            )
        return qs

    def dequantize(self, module: nn.Module, weight: Tensor) -> Tensor:
        import bitsandbytes.functional as bf

        qs = self._state(module, weight)
        data = weight.data
        if getattr(qs, "packing_format_for_cpu", False):
            data, qs = _unpack_cpu_layout(data, qs)
        full = bf.dequantize_4bit(data, qs)
        dtype = self.compute_dtype(module, weight)
        return full if dtype is None else full.to(dtype)

    def compute_dtype(self, module: nn.Module, weight: Tensor) -> torch.dtype | None:
        dtype = getattr(module, "compute_dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
        qs = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
        return getattr(qs, "original_dtype", None) or getattr(qs, "dtype", None)

    def requantize_refusal(self, module: nn.Module, weight: Tensor) -> str | None:
        return _sharded_refusal(weight)

    def snapshot(self, module: nn.Module, name: str) -> Any:
        return getattr(module, name), getattr(module, "quant_state", None)

    def restore(self, module: nn.Module, name: str, snapshot: Any) -> None:
        param, state = snapshot
        setattr(module, name, param)
        if hasattr(module, "quant_state"):
            module.quant_state = state

    def requantize(self, module: nn.Module, name: str, weight: Tensor) -> None:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf

        old = getattr(module, name)
        qs = self._state(module, old)
        original = getattr(qs, "original_dtype", None) or qs.dtype
        nested = getattr(qs, "original_nested", qs.nested)
        storage = old.dtype  # the packed codes' storage (uint8, or the model's dtype for FSDP)
        packed, state = bf.quantize_4bit(
            weight.to(original).contiguous(),
            blocksize=qs.blocksize,
            compress_statistics=nested,
            quant_type=qs.quant_type,
            quant_storage=storage,
        )
        param = bnb.nn.Params4bit(
            packed,
            requires_grad=False,
            quant_state=state,
            blocksize=qs.blocksize,
            compress_statistics=nested,
            quant_type=qs.quant_type,
            quant_storage=storage,
            module=module,
            bnb_quantized=True,
        )
        setattr(module, name, param)
        if hasattr(module, "quant_state"):
            module.quant_state = state


def _unpack_cpu_layout(data: Tensor, qs: Any) -> tuple[Tensor, Any]:
    """The standard packed layout of a weight that bitsandbytes re-packed for its AVX512
    CPU kernel (done in place at the first no-grad forward in eval mode), without touching
    the layer: a copy of the state, its block scales taken as the kernel uses them."""
    import bitsandbytes.functional as bf

    state = copy.copy(qs)
    scales = qs.absmax  # (in / blocksize, out), bfloat16: what the kernel multiplies with
    state.original_nested = False  # keep the kernel's scales; do not quantize them again
    codes, state = bf._convert_weight_packed_for_cpu_inverse(data.clone(), state)
    state.absmax = scales.t().reshape(-1).float()
    state.dtype = qs.original_dtype
    return codes, state


class _Bnb8bit:
    name = "bitsandbytes Linear8bitLt"

    def claims(self, module: nn.Module | None, weight: Tensor) -> bool:
        bnb = _bnb()
        if bnb is None:
            return False
        if isinstance(weight, bnb.nn.Int8Params):
            return weight.dtype == torch.int8
        return isinstance(module, bnb.nn.Linear8bitLt) and weight.dtype == torch.int8

    def _scales(self, module: nn.Module | None, weight: Tensor) -> Tensor:
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if scb is None:
            raise RuntimeError(
                f"{type(module).__name__}: the int8 weight has no row scales (SCB); it was "
                "never quantized: move the layer to its device with .to(device) first"
            )
        return scb

    def dequantize(self, module: nn.Module, weight: Tensor) -> Tensor:
        import bitsandbytes.functional as bf

        scb = self._scales(module, weight)
        return bf.int8_vectorwise_dequant(weight.data, scb).float()

    def compute_dtype(self, module: nn.Module, weight: Tensor) -> torch.dtype | None:
        return None  # the layer computes in its input's dtype

    def requantize_refusal(self, module: nn.Module, weight: Tensor) -> str | None:
        if getattr(weight, "has_fp16_weights", False):
            return "it keeps full-precision weights (has_fp16_weights=True)"
        return _sharded_refusal(weight)

    def snapshot(self, module: nn.Module, name: str) -> Any:
        state = getattr(module, "state", None)
        return getattr(module, name), getattr(state, "CB", None), getattr(state, "SCB", None)

    def restore(self, module: nn.Module, name: str, snapshot: Any) -> None:
        param, cb, scb = snapshot
        setattr(module, name, param)
        state = getattr(module, "state", None)
        if state is not None:
            state.CB, state.SCB = cb, scb

    def requantize(self, module: nn.Module, name: str, weight: Tensor) -> None:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf

        # the layer's own quantization: half precision, then absmax per row
        cb, scb, _ = bf.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        param = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
        setattr(module, name, param)
        state = getattr(module, "state", None)
        if state is not None:  # the layer's forward moves CB and SCB here on its next call
            state.CB, state.SCB = None, None


# --------------------------------------------------------------------------- torchao


def _torchao_tensor(weight: Tensor) -> bool:
    if sys.modules.get("torchao") is None:
        return False
    try:
        from torchao.utils import TorchAOBaseTensor
    except ImportError:
        return False
    return isinstance(weight, TorchAOBaseTensor)


class _TorchAO:
    name = "torchao"

    def claims(self, module: nn.Module | None, weight: Tensor) -> bool:
        return _torchao_tensor(weight) and callable(getattr(weight, "dequantize", None))

    def dequantize(self, module: nn.Module, weight: Tensor) -> Tensor:
        return weight.dequantize()

    def compute_dtype(self, module: nn.Module, weight: Tensor) -> torch.dtype | None:
        return weight.dtype  # the tensor's logical dtype: what it dequantizes to

    def requantize_refusal(self, module: nn.Module, weight: Tensor) -> str | None:
        kind = type(weight).__name__
        if kind == "Int8Tensor":
            if getattr(weight, "act_quant_scale", None) is not None:
                return (
                    "its activations are quantized with static scales, which a merge would not fit"
                )
            return _block_refusal(weight)
        if kind == "Float8Tensor":
            return _block_refusal(weight)
        return f"unipeft cannot re-quantize a torchao {kind} weight (only Int8Tensor, Float8Tensor)"

    def snapshot(self, module: nn.Module, name: str) -> Any:
        return getattr(module, name)

    def restore(self, module: nn.Module, name: str, snapshot: Any) -> None:
        setattr(module, name, snapshot)

    def requantize(self, module: nn.Module, name: str, weight: Tensor) -> None:
        old = getattr(module, name)
        new_weight = weight.to(old.dtype)
        granularity = _granularity(old)
        if type(old).__name__ == "Int8Tensor":
            from torchao.quantization.quant_primitives import MappingType

            zero = getattr(old, "zero_point", None)
            asymmetric = zero is not None and bool((zero != 0).any())
            new = type(old).from_hp(
                new_weight,
                granularity,
                mapping_type=MappingType.ASYMMETRIC if asymmetric else MappingType.SYMMETRIC,
                act_quant_kwargs=old.act_quant_kwargs,
                reduce_range=getattr(old, "reduce_range", False),
            )
        else:
            new = type(old).from_hp(
                new_weight,
                float8_dtype=old.qdata.dtype,
                granularity=granularity,
                mm_config=getattr(old, "mm_config", None),
                kernel_preference=old.kernel_preference,
                act_quant_kwargs=old.act_quant_kwargs,
            )
        setattr(module, name, nn.Parameter(new, requires_grad=False))


def _block_refusal(weight: Tensor) -> str | None:
    if _granularity(weight) is None:
        return f"its block size {list(weight.block_size)} is neither per row nor per tensor"
    return _sharded_refusal(weight)


def _granularity(weight: Any) -> Any:
    from torchao.quantization.granularity import PerRow, PerTensor

    block = list(weight.block_size)
    shape = list(weight.shape)
    if block == shape:
        return PerTensor()
    if len(block) == 2 and block[0] == 1 and block[1] == shape[1]:
        return PerRow()
    return None


def _sharded_refusal(weight: Tensor) -> str | None:
    if hasattr(weight, "placements") or hasattr(weight, "ds_id"):
        return "its weight is sharded across processes (FSDP, DeepSpeed ZeRO-3)"
    return None


for _codec in (_Bnb4bit(), _Bnb8bit(), _TorchAO()):
    register_weight_codec(_codec)
del _codec


# --------------------------------------------------------------------------- public helpers


def is_quantized(obj: nn.Module | Tensor) -> bool:
    """Whether a tensor, or a module's ``weight``, is stored in a quantized format unipeft
    reads (bitsandbytes 4-bit or 8-bit, a torchao tensor subclass)."""
    if isinstance(obj, nn.Module):
        return weight_codec(getattr(obj, "weight", None), obj) is not None
    return weight_codec(obj) is not None


def dequantized_weight(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """A full-precision copy ``(out, in)`` of a quantized layer's weight: the weight the
    layer multiplies with, in its compute dtype (``dtype`` to choose another). 4-bit:
    ``bitsandbytes.functional.dequantize_4bit``; 8-bit: the int8 rows times their scales
    (``SCB / 127``); torchao: the tensor's ``dequantize()``. A plain weight is copied."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    codec = weight_codec(weight, module)
    full = weight.detach().clone() if codec is None else codec.dequantize(module, weight)
    return full if dtype is None else full.to(dtype)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized ``Linear`` of ``model`` (in place) by an ``nn.Linear`` holding
    its dequantized weight (in ``dtype``, default each layer's compute dtype) and its bias.
    Use it to merge adapters on a full-precision copy, or to compare with one. Returns
    ``model``. ``requires_grad`` of the new weights follows the old ones'."""
    for name, module in list(model.named_modules()):
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or weight_codec(weight, module) is None:
            continue
        full = dequantized_weight(module, dtype)
        bias = module.bias
        linear = nn.Linear(
            full.shape[1],
            full.shape[0],
            bias=bias is not None,
            device=full.device,
            dtype=full.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(full)
            if bias is not None:
                linear.bias.copy_(bias.detach().to(full.dtype))
        linear.weight.requires_grad_(weight.requires_grad)
        if bias is not None:
            linear.bias.requires_grad_(bias.requires_grad)
        linear.train(module.training)
        if name:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, linear)
        else:
            return linear
    return model


def merge_errors(model: Any) -> dict[str, float]:
    """``max |W_merged - (W + ΔW)|`` per quantized layer that holds merged deltas now (its
    path in the backbone), from its last re-quantization; empty when nothing quantized is
    merged. ``model`` is a :class:`~unipeft.DeltaModel`."""
    adapters = getattr(model, "adapters", None)
    if not isinstance(adapters, dict) or not hasattr(model, "merged_adapters"):
        raise TypeError(f"merge_errors takes a unipeft DeltaModel, got {type(model).__name__}")
    out: dict[str, float] = {}
    for adapter in adapters.values():
        for att in adapter.attachments:
            error = _ERRORS.get(att.site.module) if att.merged else None
            if error is not None:
                out[att.site.path] = error
    return out


def prepare_quantized(
    model: nn.Module,
    *,
    upcast: str | None = "all",
    gradient_checkpointing: bool = False,
    use_reentrant: bool = False,
) -> nn.Module:
    """Get a quantized backbone ready for training adapters on it (call it before
    :func:`unipeft.apply`). Returns ``model``, changed in place.

    - ``upcast="all"``: every floating parameter that is not quantized (norms, embeddings,
      the output head) in half precision goes to float32, as PEFT's
      ``prepare_model_for_kbit_training`` does: half-precision norms and heads are where
      training loses accuracy (float16 overflows), and they are small beside the
      quantized layers. ``"norms"``: only 1-D parameters (norm scales, biases), the
      cheapest part; a norm in float32 returns float32, so every non-quantized layer after
      a norm must accept it (a half-precision output head does not: use ``"all"``).
      ``None``: leave dtypes alone.
    - ``gradient_checkpointing``: turns on the model's gradient checkpointing (Hugging Face
      ``gradient_checkpointing_enable``). With ``use_reentrant=True`` the input embeddings'
      output is also made to require gradients: reentrant checkpointing runs a segment
      without gradients when none of its inputs requires them, and the frozen embeddings'
      output does not, so no gradient would reach the adapters in the blocks.

    Not done, unlike PEFT: freezing the parameters (``apply`` freezes the backbone and
    ``unload`` restores ``requires_grad`` as it found it) and casting the adapters (they
    take each layer's compute dtype; ``model.deltas.float()`` keeps them in float32).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_quantized takes an nn.Module, got {type(model).__name__}")
    if upcast not in ("all", "norms", None):
        raise ConfigError(f"upcast must be 'all', 'norms' or None, got {upcast!r}")
    quantized = {id(p) for m in model.modules() for p in _quantized_params(m)}
    if upcast is not None:
        for p in model.parameters():
            if id(p) in quantized or not p.is_floating_point() or p.dtype == torch.float32:
                continue
            if upcast == "all" or p.dim() == 1:
                p.data = p.data.float()
    if gradient_checkpointing:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if not callable(enable):
            raise ConfigError(
                f"{type(model).__name__} has no gradient_checkpointing_enable(); wrap its "
                "blocks with torch.utils.checkpoint yourself, or pass "
                "gradient_checkpointing=False"
            )
        enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        if use_reentrant:
            _inputs_require_grad(model)
    return model


def _quantized_params(module: nn.Module) -> list[Tensor]:
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight_codec(weight, module) is not None:
        return [weight]
    return []


def _inputs_require_grad(model: nn.Module) -> None:
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        enable()
        return
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, nn.Module):
        raise ConfigError(
            f"{type(model).__name__} has no input embeddings to make require gradients; use "
            "use_reentrant=False"
        )
    embeddings.register_forward_hook(lambda mod, args, out: out.requires_grad_(True))


_ERRORS: weakref.WeakKeyDictionary[nn.Module, float] = weakref.WeakKeyDictionary()


def record_error(module: nn.Module, error: float | None) -> None:
    """Keep (or, with ``None``, drop) the re-quantization error of a layer that holds merged
    deltas (called by the merge ledger; read by :func:`merge_errors`)."""
    if error is None:
        _ERRORS.pop(module, None)
    else:
        _ERRORS[module] = error


def warn_merge(errors: dict[str, float]) -> None:
    """The warning a merge into quantized layers gives (called by the merge ledger)."""
    if not errors:
        return
    worst = max(errors, key=errors.__getitem__)
    warnings.warn(
        f"merged into {len(errors)} quantized layer(s) by re-quantizing them: the merged "
        f"weights differ from W + ΔW by up to {errors[worst]:.3g} (at {worst}); "
        "unipeft.quantization.merge_errors(model) gives every layer's error, and unmerge() "
        "restores the original quantized weights exactly",
        QuantizedMergeWarning,
        stacklevel=4,
    )


def quantize_linears(
    model: nn.Module,
    *,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    quant_storage: torch.dtype = torch.uint8,
    threshold: float = 0.0,
    skip: tuple[str, ...] = ("lm_head",),
    device: torch.device | str | None = None,
) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model`` (in place; those whose name ends with
    one of ``skip`` excepted) by bitsandbytes layers holding their weights quantized on
    ``device`` (default: where each weight is): ``bits=4`` gives ``Linear4bit`` (NF4 or
    FP4 codes, ``double_quant`` quantizes the block scales too, ``compute_dtype`` is the
    matmul dtype), ``bits=8`` gives ``Linear8bitLt`` (``threshold``: the outlier threshold
    of LLM.int8(); 0 disables it). The same layers as a Hugging Face model loaded with a
    ``BitsAndBytesConfig``, for a model built in memory (random weights, a benchmark).
    Returns ``model``."""
    import bitsandbytes as bnb

    if bits not in (4, 8):
        raise ConfigError(f"bits must be 4 or 8, got {bits!r}")
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or any(name.endswith(s) for s in skip):
            continue
        target = torch.device(device) if device is not None else module.weight.device
        weight = module.weight.detach()
        bias = module.bias
        if bits == 4:
            layer = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=double_quant,
                quant_type=quant_type,
                quant_storage=quant_storage,
                device="meta",
            )
            layer.weight = bnb.nn.Params4bit(
                weight,  # quantized where it is moved to below
                requires_grad=False,
                compress_statistics=double_quant,
                quant_type=quant_type,
                quant_storage=quant_storage,
                module=layer,
            )
        else:
            layer = bnb.nn.Linear8bitLt(
                module.in_features,
                module.out_features,
                bias=bias is not None,
                has_fp16_weights=False,
                threshold=threshold,
                device="meta",
            )
            layer.weight = bnb.nn.Int8Params(  # quantized when moved off the CPU copy
                weight.to("cpu"), requires_grad=False, has_fp16_weights=False
            )
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        layer = layer.to(target)  # bitsandbytes quantizes on this move
        layer.train(module.training)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer)
    # the flag transformers sets on a model it loads quantized (PEFT reads it to pick its
    # bitsandbytes layers)
    setattr(model, f"is_loaded_in_{bits}bit", True)
    return model
