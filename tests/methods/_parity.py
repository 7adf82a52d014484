"""What the PEFT-parity tests of several methods share: the tiny backbones both libraries
start from (BERT, GPT-2 and a timm ViT, built from configs with seed 0), running them on
fixed inputs, and the comparison at float32 tolerance.

Two styles, as the tests were written: ``base``/``run``/``close_and_moved`` (random inputs
drawn per call from seed 7, a 5-class ViT head, and a check that the adapter moved the
output) and ``make``/``run_fixed``/``close`` (fixed inputs, a 10-class ViT head)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertModel(cfg).eval()


def _vit(classes: int) -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
        depth=2, num_heads=2, num_classes=classes,
    ).eval()  # fmt: skip


# ----------------------------------------------------------------------------- first style


def base(kind: str) -> nn.Module:
    """A tiny random ``bert``, ``gpt2`` or ``vit`` (5 classes), seed 0."""
    torch.manual_seed(0)
    if kind == "bert":
        return _bert()
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=100,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        return transformers.GPT2Model(cfg).eval()
    return _vit(5)


def run(model: nn.Module, kind: str) -> Tensor:
    """The model's output on inputs drawn from seed 7 (the same on every call)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if kind == "vit":
            return model(torch.randn(2, 3, 32, 32, generator=g))
        return model(input_ids=torch.randint(0, 100, (2, 7), generator=g)).last_hidden_state


def max_diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def close_and_moved(a: Tensor, b: Tensor, base_out: Tensor, what: str) -> float:
    """``a`` and ``b`` agree at float32 tolerance, and both differ from the base output."""
    d = max_diff(a, b)
    scale = max(1.0, b.abs().max().item())
    moved = max_diff(b, base_out)
    print(f"{what}: max abs diff {d:.3e} (output scale {scale:.3g}; adapter moved it {moved:.3g})")
    assert moved > 1e-3 * scale, f"{what}: the adapter is (nearly) the identity, nothing compared"
    assert d <= 1e-5 * scale, f"{what}: {d:.3e}"
    return d


# ----------------------------------------------------------------------------- second style

IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def make(arch: str) -> nn.Module:
    """A tiny random ``bert`` or ``vit`` (10 classes), seed 0."""
    torch.manual_seed(0)
    return _bert() if arch == "bert" else _vit(10)


def run_fixed(model: nn.Module, arch: str) -> Tensor:
    with torch.no_grad():
        if arch == "bert":
            return model(input_ids=IDS).last_hidden_state
        return model(IMAGES)


def randomise(params, seed: int = 0) -> None:
    """Noise on every trainable tensor, so the adapter is far from the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def close(got: Tensor, want: Tensor, what: str) -> float:
    diff = (got - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    print(f"{what}: max |diff| = {diff:.3e} (output scale {scale:.3g})")
    assert diff <= 1e-5 * scale, f"{what}: {diff:.3e} > {1e-5 * scale:.3e}"
    return diff
