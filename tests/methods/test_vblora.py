"""VB-LoRA: parity with Hugging Face PEFT's VBLORA both ways (BERT and a timm ViT), merged
weights, top-k-only folders, the shared vector bank (trained, counted and saved once), refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

import unipeft  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402
from unipeft.features.saving import WEIGHTS_FILE  # noqa: E402

# PEFT module names, and the same modules as unipeft targets (generic sites, by path)
CASES = {
    "bert": (
        ["query", "value", "intermediate.dense"],
        [r".*self\.(query|value)", r".*\.intermediate\.dense"],
    ),
    "vit": (["qkv", "fc1"], [r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.mlp\.fc1"]),
}
IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def make(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "bert":
        cfg = transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return transformers.BertModel(cfg).eval()
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
        depth=2, num_heads=2, num_classes=10,
    ).eval()  # fmt: skip


def run(model: nn.Module, arch: str) -> torch.Tensor:
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


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    diff = (got - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    print(f"{what}: max |diff| = {diff:.3e} (output scale {scale:.3g})")
    assert diff <= 1e-5 * scale, f"{what}: {diff:.3e} > {1e-5 * scale:.3e}"
    return diff


KW = {"r": 2, "num_vectors": 8, "vector_length": 16, "topk": 3}


def peft_model(base: nn.Module, arch: str, **kw) -> nn.Module:
    config = peft.VBLoRAConfig(target_modules=CASES[arch][0], **KW, **kw)
    model = peft.get_peft_model(base, config).eval()
    randomise(p for p in model.parameters() if p.requires_grad)
    return model


@pytest.mark.parametrize(
    ("arch", "topk_only"), [("bert", False), ("vit", False), ("bert", True), ("vit", True)]
)
def test_from_peft(arch: str, topk_only: bool, tmp_path: Path) -> None:
    base = make(arch)
    theirs = peft_model(copy.deepcopy(base), arch, save_only_topk_weights=topk_only)
    theirs.save_pretrained(str(tmp_path))
    keys = load_file(tmp_path / interop.WEIGHTS_FILE)
    assert any(k.endswith("_topk_indices") for k in keys) is topk_only
    if topk_only:  # what PEFT itself computes after loading such a folder
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    expected = run(theirs, arch)
    assert (expected - run(base, arch)).abs().max() > 1e-2  # not the identity
    ours = interop.load(copy.deepcopy(base), tmp_path)
    adapter = ours.adapters["default"]
    assert adapter.method.id == "vblora" and adapter.config.topk == 3
    assert adapter.config.save_only_topk_weights is topk_only
    close(run(ours, arch), expected, f"{arch} PEFT -> unipeft (top-k only: {topk_only})")
    ours.merge()
    merged = theirs.merge_and_unload().state_dict()
    worst = max((ours.base_model.state_dict()[k] - v).abs().max().item() for k, v in merged.items())
    print(f"{arch} merged weights (top-k only: {topk_only}): max |diff| = {worst:.3e}")
    assert worst <= 1e-6


@pytest.mark.parametrize(("arch", "topk_only"), [("bert", False), ("vit", False), ("vit", True)])
def test_to_peft(arch: str, topk_only: bool, tmp_path: Path) -> None:
    base = make(arch)
    ours = unipeft.apply(
        copy.deepcopy(base), "vblora", targets=CASES[arch][1], save_only_topk_weights=topk_only,
        **KW,
    ).eval()  # fmt: skip
    randomise(ours.deltas.parameters())
    expected = run(ours, arch)
    assert (expected - run(base, arch)).abs().max() > 1e-2
    interop.save(ours, tmp_path)
    keys = load_file(tmp_path / interop.WEIGHTS_FILE)
    assert "base_model.vblora_vector_bank" in keys
    indices = [v for k, v in keys.items() if k.endswith("_topk_indices")]
    assert bool(indices) is topk_only and all(v.dtype == torch.uint8 for v in indices)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    close(run(theirs, arch), expected, f"{arch} unipeft -> PEFT (top-k only: {topk_only})")


def test_saves_the_bank_once_and_loads_back(tmp_path: Path) -> None:
    ours = unipeft.apply(make("bert"), "vblora", targets=["attn.q", "attn.v", "mlp.up"], **KW)
    randomise(ours.deltas.parameters())
    expected = run(ours, "bert")
    ours.save(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_FILE)
    shared = [k for k in saved if "__shared__" in k]
    assert shared == ["default::__shared__::vblora.vectors"]
    assert saved[shared[0]].shape == (8, 16)
    per_site = [k.rsplit(".", 1)[1] for k in saved if "__shared__" not in k]
    assert set(per_site) == {"logits_A", "logits_B"} and len(per_site) == 2 * 6
    loaded = unipeft.load(make("bert"), tmp_path)
    assert torch.equal(run(loaded, "bert"), expected)
    assert torch.equal(loaded.deltas["default"]["__shared__"].vectors, saved[shared[0]])


def test_bank_is_trained_and_counted_once() -> None:
    model = unipeft.apply(make("vit"), "vblora", targets=["attn.q", "mlp.up"], **KW)
    # per site r (d_in + d_out) / L · N: q 2·(32+32)/16·8 = 64, up 2·(32+128)/16·8 = 160
    assert model.num_trainable_parameters() == 2 * (64 + 160) + 8 * 16
    bank = model.deltas["default"]["__shared__"].vectors
    deltas = [d for name, d in model.deltas["default"].items() if name != "__shared__"]
    assert all(d.shared.vectors is bank for d in deltas)  # a reference, not a copy
    model(IMAGES).sum().backward()
    assert bank.grad is not None and bank.grad.abs().sum() > 0


def test_vector_length_must_divide_the_widths() -> None:
    with pytest.raises(unipeft.ConfigError, match=r"vector_length=24 does not divide .* 32"):
        unipeft.apply(make("bert"), "vblora", vector_length=24, targets=["attn.q"])
    with pytest.raises(unipeft.ConfigError, match="topk=9 is above num_vectors=8"):
        unipeft.apply(make("bert"), "vblora", num_vectors=8, topk=9)


def test_convolutions_are_refused() -> None:
    with pytest.raises(unipeft.TargetError, match=r"'patch_embed\.proj' is a convolution"):
        unipeft.apply(make("vit"), "vblora", vector_length=8, targets=["embed"])
