"""FourierFT: ``ΔW = scaling · Re(IDFT2(S))`` with trainable coefficients at fixed, saved
positions; PEFT folders both ways on BERT, a timm ViT and GPT-2 (Conv1D), merged weights
included, and the refusals.

Every comparison starts both libraries from ``copy.deepcopy`` of one random backbone."""

from __future__ import annotations

import copy
import math
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
from unipeft.methods.reparameterized.fourierft import FourierFTDelta  # noqa: E402
from unipeft.testing.backbones import BACKBONES  # noqa: E402

CASES = {
    # kind: (PEFT target_modules, unipeft targets)
    "bert": (
        ["query", "value", "intermediate.dense"],
        [r"encoder\.layer\.\d+\.attention\.self\.(query|value)", r".*intermediate\.dense"],
    ),
    "vit": (["qkv", "fc1"], [r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.mlp\.fc1"]),
    "gpt2": (["c_attn", "c_fc"], [r"h\.\d+\.attn\.c_attn", r"h\.\d+\.mlp\.c_fc"]),
}


# ----------------------------------------------------------------------------- the maths


def test_delta_is_the_inverse_dft_of_the_sparse_spectrum() -> None:
    delta = FourierFTDelta(ProjectionShape(12, 10), 30, 2.5, 5)
    rows, cols = delta.indices
    assert delta.indices.dtype == torch.int64 and delta.indices.shape == (2, 30)
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) == 30  # distinct positions
    # Re(IDFT2) written out: (1 / (out·in)) Σ_k c_k cos(2π (u_k p / out + v_k q / in))
    p = torch.arange(10, dtype=torch.float64)[:, None, None]
    q = torch.arange(12, dtype=torch.float64)[None, :, None]
    phase = 2 * math.pi * (rows.double() * p / 10 + cols.double() * q / 12)
    dense = (delta.spectrum.detach().double() * torch.cos(phase)).sum(-1) / 120 * 2.5
    torch.testing.assert_close(delta.delta_weight().double(), dense, atol=1e-6, rtol=1e-5)
    x, y = torch.randn(4, 12), torch.randn(4, 10)
    torch.testing.assert_close(delta(x, y), y + x @ delta.delta_weight().t())


def test_positions_are_a_saved_buffer_loaded_as_saved(tmp_path: Path) -> None:
    bb = BACKBONES["gpt2"]
    model = unipeft.apply(bb.make(), "fourierft", n_frequency=40, targets=["attn.q", "mlp.up"])
    delta = model.adapters["default"].attachments[0].delta
    assert "indices" in dict(delta.named_buffers()) and "indices" in delta.state_dict()
    assert model.num_trainable_parameters() == 40 * 4  # the positions do not train
    with torch.no_grad():  # positions a seed would not give: the file's must win
        delta.indices.copy_(delta.indices.flip(1))
    expected = bb.run(model, bb.sample(0))
    model.save(tmp_path)
    loaded = unipeft.load(bb.make(), tmp_path)
    again = loaded.adapters["default"].attachments[0].delta
    assert torch.equal(again.indices, delta.indices)
    torch.testing.assert_close(bb.run(loaded, bb.sample(0)), expected, atol=0, rtol=0)


def test_every_linear_layout_runs_and_merges() -> None:
    """Fused q/v slices (timm), GPT-2 Conv1D, MHA in_proj slices and out_proj (open_clip)."""
    every_layout_merges("fourierft", n_frequency=64, scaling=20.0)


def test_sizes_and_sites_are_refused_naming_the_limit() -> None:
    with pytest.raises(unipeft.ConfigError, match=r"n_frequency=1025 .*must be <= 1024"):
        unipeft.apply(BACKBONES["bert"].make(), "fourierft", n_frequency=1025)
    with pytest.raises(unipeft.TargetError, match=r"fourierft adapts linear projections.*conv"):
        unipeft.apply(BACKBONES["timm_vit"].make(), "fourierft", n_frequency=8, targets=["embed"])
    method = unipeft.get_method("fourierft")
    assert not method.is_identity_at_init(method.config())  # PEFT's default: N(0, 1)
    assert method.is_identity_at_init(method.config(init="zeros"))


# ----------------------------------------------------------------------------- PEFT parity


@pytest.mark.parametrize("kind", ["bert", "vit", "gpt2"])
def test_from_peft(kind: str, tmp_path: Path) -> None:
    base = _base(kind)
    peft_targets, _ = CASES[kind]
    config = peft.FourierFTConfig(
        n_frequency=100, scaling=30.0, random_loc_seed=11, target_modules=peft_targets,
        fan_in_fan_out=kind == "gpt2",
    )  # fmt: skip
    ref = peft.get_peft_model(copy.deepcopy(base), config).eval()
    randn_([p for n, p in ref.named_parameters() if "fourierft_spectrum" in n], 1)
    ref.save_pretrained(str(tmp_path))
    model = interop.load(copy.deepcopy(base), tmp_path).eval()
    assert model.adapters["default"].config.random_loc_seed == 11
    for att in model.adapters["default"].attachments:  # PEFT's positions, drawn again
        peft_layer = ref.get_submodule(f"base_model.model.{att.site.path}")
        assert torch.equal(att.delta.indices, peft_layer.indices["default"])
    expected = _run(ref, kind)
    assert (expected - _run(base, kind)).abs().max() > 1e-2  # not the identity
    close(_run(model, kind), expected, f"fourierft {kind} from PEFT")
    model.merge()
    merged_diff(model.base_model, ref.merge_and_unload(), f"fourierft {kind} from PEFT")


@pytest.mark.parametrize("kind", ["bert", "vit", "gpt2"])
def test_to_peft(kind: str, tmp_path: Path) -> None:
    base = _base(kind)
    _, targets = CASES[kind]
    model = unipeft.apply(
        copy.deepcopy(base), "fourierft", n_frequency=50, scaling=40.0, random_loc_seed=3,
        targets=targets,
    ).eval()  # fmt: skip
    randn_(list(model.deltas.parameters()), 3)
    expected = _run(model, kind)
    assert (expected - _run(base, kind)).abs().max() > 1e-2
    interop.save(model, tmp_path)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    close(_run(ref, kind), expected, f"fourierft {kind} to PEFT")
    model.merge()
    merged_diff(model.base_model, ref.merge_and_unload(), f"fourierft {kind} to PEFT")


def test_export_refuses_positions_the_seed_does_not_give(tmp_path: Path) -> None:
    model = unipeft.apply(_base("bert"), "fourierft", n_frequency=20, targets=[r".*\.query"])
    delta = model.adapters["default"].attachments[0].delta
    with torch.no_grad():
        delta.indices[0, 0] = (delta.indices[0, 0] + 1) % 32
    with pytest.raises(unipeft.AdapterError, match="random_loc_seed=777"):
        interop.save(model, tmp_path)


def test_n_frequency_pattern_is_refused(tmp_path: Path) -> None:
    base = _base("bert")
    config = peft.FourierFTConfig(
        n_frequency=20, target_modules=["query", "value"], n_frequency_pattern={"value": 30}
    )
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(str(tmp_path))
    with pytest.raises(unipeft.LoadError, match="n_frequency_pattern"):
        interop.load(copy.deepcopy(base), tmp_path)
