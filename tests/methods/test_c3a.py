"""C3A: a block-circulant ``ΔW`` applied with FFTs; PEFT folders both ways on BERT and a timm
ViT, merged weights included, and the refusals (block sizes, convolutions, Conv1D export).

Every comparison starts both libraries from ``copy.deepcopy`` of one random backbone."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from _parity_spectral import base as _base  # noqa: E402
from _parity_spectral import (  # noqa: E402
    close,
    every_layout_merges,
    merged_diff,
    randn_,
)
from _parity_spectral import run as _run  # noqa: E402

import unipeft  # noqa: E402
from unipeft.contract.deltas import ProjectionShape  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402
from unipeft.methods.reparameterized.c3a import C3ADelta  # noqa: E402
from unipeft.testing.backbones import BACKBONES  # noqa: E402

CASES = {
    # kind: (PEFT target_modules, unipeft targets)
    "bert": (
        ["query", "value", "intermediate.dense"],
        [r"encoder\.layer\.\d+\.attention\.self\.(query|value)", r".*intermediate\.dense"],
    ),
    "vit": (["qkv", "fc1"], [r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.mlp\.fc1"]),
}


# ----------------------------------------------------------------------------- the maths


def test_the_fft_forward_is_the_block_circulant_weight() -> None:
    delta = C3ADelta(ProjectionShape(48, 32), 8, "gaussian")
    w = delta.kernel.detach()
    dense = torch.zeros(32, 48)
    for i in range(4):
        for j in range(6):
            for t in range(8):
                for s in range(8):
                    dense[i * 8 + t, j * 8 + s] = w[i, j, (s - t) % 8]
    dense /= 48
    torch.testing.assert_close(delta.delta_weight(), dense, atol=0, rtol=0)
    x, y = torch.randn(3, 5, 48), torch.randn(3, 5, 32)
    torch.testing.assert_close(delta(x, y), y + x @ dense.t(), atol=1e-6, rtol=1e-5)
    assert torch.equal(C3ADelta(ProjectionShape(48, 32), 8, "zeros").delta_weight(), 0 * dense)


def test_every_linear_layout_runs_and_merges() -> None:
    """Fused q/v slices (timm), GPT-2 Conv1D, MHA in_proj slices and out_proj (open_clip)."""
    every_layout_merges("c3a", 2, block_size=8)


def test_block_size_that_does_not_divide_is_refused_naming_it() -> None:
    with pytest.raises(unipeft.ConfigError, match=r"block_size=5 .*divisor of 32"):
        unipeft.apply(BACKBONES["bert"].make(), "c3a", block_size=5)
    with pytest.raises(unipeft.ConfigError, match="'init'"):
        unipeft.apply(BACKBONES["bert"].make(), "c3a", init="orthogonal")


def test_convolutions_are_refused_with_a_reason() -> None:
    with pytest.raises(unipeft.TargetError, match=r"c3a adapts linear projections.*convolution"):
        unipeft.apply(BACKBONES["timm_vit"].make(), "c3a", block_size=8, targets=["embed"])


def test_identity_only_with_zeros() -> None:
    method = unipeft.get_method("c3a")
    assert not method.is_identity_at_init(method.config())  # PEFT's default: xavier_uniform
    assert method.is_identity_at_init(method.config(init="zeros"))


# ----------------------------------------------------------------------------- PEFT parity


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_from_peft(kind: str, tmp_path: Path) -> None:
    base = _base(kind)
    peft_targets, _ = CASES[kind]
    config = peft.C3AConfig(block_size=8, target_modules=peft_targets, init_weights="gaussian")
    ref = peft.get_peft_model(copy.deepcopy(base), config).eval()
    randn_([p for n, p in ref.named_parameters() if "c3a_kernel" in n], 1)
    ref.save_pretrained(str(tmp_path))
    model = interop.load(copy.deepcopy(base), tmp_path).eval()
    assert model.adapters["default"].config.block_size == 8
    expected = _run(ref, kind)
    assert (expected - _run(base, kind)).abs().max() > 1e-2  # not the identity
    close(_run(model, kind), expected, f"c3a {kind} from PEFT")
    model.merge()
    merged_diff(model.base_model, ref.merge_and_unload(), f"c3a {kind} from PEFT", scaled=False)


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_to_peft(kind: str, tmp_path: Path) -> None:
    base = _base(kind)
    _, targets = CASES[kind]
    model = unipeft.apply(copy.deepcopy(base), "c3a", block_size=16, targets=targets).eval()
    randn_(list(model.deltas.parameters()), 3)
    expected = _run(model, kind)
    interop.save(model, tmp_path)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert ref.peft_config["default"].block_size == 16
    close(_run(ref, kind), expected, f"c3a {kind} to PEFT")
    merged = ref.merge_and_unload()
    model.merge()
    merged_diff(model.base_model, merged, f"c3a {kind} to PEFT", scaled=False, same_keys=False)


def test_export_refuses_what_peft_cannot_adapt(tmp_path: Path) -> None:
    gpt2 = unipeft.apply(BACKBONES["gpt2"].make(), "c3a", block_size=8, targets=[r".*c_fc"])
    with pytest.raises(unipeft.AdapterError, match=r"not one PEFT's C3A adapts \(nn.Linear\)"):
        interop.save(gpt2, tmp_path)
    vit = unipeft.apply(BACKBONES["timm_vit"].make(), "c3a", block_size=8, targets=["attn.q"])
    with pytest.raises(unipeft.AdapterError, match="slice"):
        interop.save(vit, tmp_path)


def test_block_size_pattern_is_refused(tmp_path: Path) -> None:
    base = _base("bert")
    config = peft.C3AConfig(
        block_size=8, target_modules=["query"], block_size_pattern={"query": 16}
    )
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(str(tmp_path))
    with pytest.raises(unipeft.LoadError, match="block_size_pattern"):
        interop.load(copy.deepcopy(base), tmp_path)
