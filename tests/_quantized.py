"""A tiny Llama with quantized Linear layers, and its full-precision twin, for the tests of
quantized bases (tests/test_quantized.py on the CPU, tests/test_gpu_quantized.py on CUDA)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch
from torch import nn

from unipeft import quantization as Q

# (kind, library it needs)
KINDS = {
    "nf4": "bitsandbytes",
    "fp4-dq": "bitsandbytes",
    "nf4-dq": "bitsandbytes",
    "int8": "bitsandbytes",
    "torchao-int8": "torchao",
    "torchao-fp8": "torchao",
}
BNB_KINDS = ("nf4", "fp4-dq", "int8")


def needs(kind: str) -> None:
    """Skip, naming the reason, when the library a kind needs is not importable."""
    lib = KINDS[kind]
    try:
        importlib.import_module(lib)
    except ImportError as exc:
        pytest.skip(f"{lib} cannot be imported ({exc}); {kind} layers need it")


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=2 * hidden,
            vocab_size=128,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    return model.eval()


def quantize(
    model: nn.Module,
    kind: str,
    compute_dtype: torch.dtype = torch.float32,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Quantize the Linear layers of the decoder blocks (not the output head) as ``kind``,
    after moving the model to ``device`` and ``dtype`` (the non-quantized parameters')."""
    needs(kind)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    if kind in ("nf4", "fp4-dq", "nf4-dq"):
        Q.quantize_linears(
            model,
            bits=4,
            quant_type=kind[:3],
            double_quant=kind.endswith("-dq"),
            compute_dtype=compute_dtype,
            device=device,
        )
        for module in model.modules():
            # bitsandbytes re-packs 4-bit weights in place for its AVX512 CPU kernel at the
            # first no-grad forward in eval mode; keep the standard layout in these tests
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    elif kind == "int8":
        Q.quantize_linears(model, bits=8, device=device)
    else:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        config = Int8WeightOnlyConfig() if kind == "torchao-int8" else Float8WeightOnlyConfig()
        quantize_(model.model, config)
    return model


def quantized_llama(kind: str, seed: int = 0, **kw) -> nn.Module:
    return quantize(tiny_llama(seed), kind, **kw)


def dequantized_twin(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same model in full precision: every quantized layer an ``nn.Linear`` holding the
    weight that layer computes with (built fresh, then the weights copied in)."""
    twin = tiny_llama(seed, hidden=model.config.hidden_size, layers=model.config.num_hidden_layers)
    ref = model.get_input_embeddings().weight
    twin.to(device=ref.device, dtype=ref.dtype)
    mine = dict(model.named_modules())
    with torch.no_grad():
        for name, module in twin.named_modules():
            src = mine[name]
            if isinstance(module, nn.Linear) and Q.is_quantized(src):
                module.weight.copy_(Q.dequantized_weight(src, module.weight.dtype))
    return twin


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor that stores a quantized weight (packed codes, block scales, row scales,
    torchao's inner tensors), cloned, by name: to check that training leaves them alone."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or not Q.is_quantized(w):
            continue
        if hasattr(w, "__tensor_flatten__") and not hasattr(w, "quant_state"):
            for inner in w.__tensor_flatten__()[0]:
                out[f"{name}.{inner}"] = getattr(w, inner).detach().clone()
            continue
        out[f"{name}.weight"] = w.data.detach().clone()
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            out[f"{name}.absmax"] = qs.absmax.detach().clone()
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if scb is not None:
            out[f"{name}.SCB"] = scb.detach().clone()
    return out


def perturb_(model: nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Move every delta parameter away from its (identity) init, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.deltas.named_parameters()):
            p.add_((torch.randn(p.shape, generator=g) * scale).to(p.device, p.dtype))


METHODS: dict[str, dict] = {
    "lora": dict(r=4, targets=["attn.q", "attn.v", "mlp.down"]),
    "dora": dict(r=4, targets=["attn.q", "mlp.up"]),
    "ia3": {},
    "bottleneck_adapter": dict(targets=["mlp.down"], bottleneck=8),
    "prompt_tuning": dict(num_tokens=3),
}


def lm_loss(model: Callable, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss
