"""WaveFT: ``ΔW = scaling · crop(IDWT2(S))`` with trainable coefficients at fixed, saved
positions and the inverse wavelet transform computed in torch; the filters; PEFT folders both
ways on BERT, a timm ViT and GPT-2 (Conv1D), merged weights included, and the refusals.

Every comparison starts both libraries from ``copy.deepcopy`` of one random backbone."""

from __future__ import annotations

import copy
import json
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
from unipeft.methods.reparameterized.waveft import (  # noqa: E402
    DAUBECHIES,
    SYMLETS,
    WaveFTDelta,
    reconstruction_lowpass,
)
from unipeft.testing.backbones import BACKBONES  # noqa: E402

CASES = {
    # kind: (PEFT target_modules, unipeft targets, wavelet, use_idwt)
    "bert": (
        ["query", "value", "intermediate.dense"],
        [r"encoder\.layer\.\d+\.attention\.self\.(query|value)", r".*intermediate\.dense"],
        "db1",
        True,
    ),
    "vit": (["qkv", "fc1"], [r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.mlp\.fc1"], "sym4", True),
    "gpt2": (["c_attn", "c_fc"], [r"h\.\d+\.attn\.c_attn", r"h\.\d+\.mlp\.c_fc"], "db3", True),
    "bert-sparse": (["query", "value"], [r".*\.(query|value)"], "db2", False),
}


# ----------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("family", DAUBECHIES + SYMLETS)
def test_filters_are_orthonormal_with_vanishing_moments(family: str) -> None:
    h = torch.tensor(reconstruction_lowpass(family), dtype=torch.float64)
    n = len(h) // 2
    assert len(h) == 2 * n and math.isclose(h.sum().item(), math.sqrt(2), abs_tol=1e-12)
    for shift in range(n):  # Σ_k h_k h_{k+2m} = δ_m
        dot = (h[2 * shift :] * h[: len(h) - 2 * shift]).sum().item()
        assert math.isclose(dot, float(shift == 0), abs_tol=1e-11), (family, shift, dot)
    k = torch.arange(len(h), dtype=torch.float64)
    sign = (-1.0) ** k
    for power in range(n):  # N vanishing moments of the wavelet
        moment = (sign * k**power * h).sum().item() / (len(h) ** power)
        assert abs(moment) < 1e-9, (family, power, moment)
    # the same filter PEFT's wavelet table holds
    table = torch.tensor(peft.tuners.waveft.wavelet.Wavelet(family).rec_lo, dtype=torch.float64)
    assert (h - table).abs().max() < 1e-11


def test_haar_coefficients_make_two_by_two_blocks() -> None:
    delta = WaveFTDelta(ProjectionShape(8, 6), 1, 1.0, "db1", True, 0, "zeros")
    quadrant = {(0, 0): [[1, 1], [1, 1]], (0, 1): [[1, 1], [-1, -1]], (1, 0): [[1, -1], [1, -1]]}
    for (qr, qc), block in quadrant.items():
        with torch.no_grad():
            delta.indices.copy_(torch.tensor([[qr * 3 + 1], [qc * 4 + 2]]))
            delta.spectrum.fill_(2.0)
        want = torch.zeros(6, 8)
        want[2:4, 4:6] = torch.tensor(block, dtype=torch.float32)  # 2 · (1/√2)² · ±1
        torch.testing.assert_close(delta.delta_weight(), want, atol=1e-6, rtol=0)


def test_sparse_mode_and_the_forward() -> None:
    delta = WaveFTDelta(ProjectionShape(12, 10), 30, 2.0, "sym3", False, 4, "gaussian")
    dense = torch.zeros(10, 12)
    dense[delta.indices[0], delta.indices[1]] = 2.0 * delta.spectrum.detach()
    torch.testing.assert_close(delta.delta_weight(), dense, atol=0, rtol=0)
    delta = WaveFTDelta(ProjectionShape(12, 10), 30, 2.0, "sym3", True, 4, "gaussian")
    x, y = torch.randn(4, 12), torch.randn(4, 10)
    torch.testing.assert_close(delta(x, y), y + x @ delta.delta_weight().t())


def test_positions_are_a_saved_buffer_loaded_as_saved(tmp_path: Path) -> None:
    bb = BACKBONES["gpt2"]
    model = unipeft.apply(bb.make(), "waveft", n_frequency=40, init="gaussian", targets=["attn.q"])
    delta = model.adapters["default"].attachments[0].delta
    assert delta.indices.dtype == torch.int64 and "indices" in delta.state_dict()
    with torch.no_grad():
        delta.indices.copy_(delta.indices.flip(1))
    expected = bb.run(model, bb.sample(0))
    model.save(tmp_path)
    again = unipeft.load(bb.make(), tmp_path)
    assert torch.equal(again.adapters["default"].attachments[0].delta.indices, delta.indices)
    torch.testing.assert_close(bb.run(again, bb.sample(0)), expected, atol=0, rtol=0)


def test_every_linear_layout_runs_and_merges() -> None:
    """Fused q/v slices (timm), GPT-2 Conv1D, MHA in_proj slices and out_proj (open_clip)."""
    every_layout_merges("waveft", 2, n_frequency=64, wavelet_family="db2")


def test_sizes_and_sites_are_refused_naming_the_limit() -> None:
    with pytest.raises(unipeft.ConfigError, match=r"n_frequency=1025 .*must be <= 1024"):
        unipeft.apply(BACKBONES["bert"].make(), "waveft", n_frequency=1025)
    with pytest.raises(unipeft.TargetError, match=r"waveft adapts linear projections.*conv"):
        unipeft.apply(BACKBONES["timm_vit"].make(), "waveft", n_frequency=8, targets=["embed"])
    with pytest.raises(unipeft.ConfigError, match="'wavelet_family'"):
        unipeft.apply(BACKBONES["bert"].make(), "waveft", n_frequency=8, wavelet_family="coif1")
    method = unipeft.get_method("waveft")
    assert method.is_identity_at_init(method.config())  # PEFT's default: zeros
    assert not method.is_identity_at_init(method.config(init="gaussian"))


# ----------------------------------------------------------------------------- PEFT parity


@pytest.mark.parametrize("kind", list(CASES))
def test_from_peft(kind: str, tmp_path: Path) -> None:
    base = _base(kind)
    peft_targets, _, family, idwt = CASES[kind]
    config = peft.WaveFTConfig(
        n_frequency=90, scaling=3.0, random_loc_seed=5, wavelet_family=family, use_idwt=idwt,
        target_modules=peft_targets, fan_in_fan_out=kind == "gpt2",
    )  # fmt: skip
    ref = peft.get_peft_model(copy.deepcopy(base), config).eval()
    randn_([p for n, p in ref.named_parameters() if "waveft_spectrum" in n], 1)
    ref.save_pretrained(str(tmp_path))
    model = interop.load(copy.deepcopy(base), tmp_path).eval()
    assert model.adapters["default"].config.wavelet_family == family
    for att in model.adapters["default"].attachments:  # PEFT's positions, drawn again
        peft_layer = ref.get_submodule(f"base_model.model.{att.site.path}")
        assert torch.equal(att.delta.indices, peft_layer.waveft_indices["default"])
    expected = _run(ref, kind)
    assert (expected - _run(base, kind)).abs().max() > 1e-2  # not the identity
    close(_run(model, kind), expected, f"waveft {kind} ({family}) from PEFT")
    model.merge()
    merged_diff(model.base_model, ref.merge_and_unload(), f"waveft {kind} ({family}) from PEFT")


@pytest.mark.parametrize("kind", list(CASES))
def test_to_peft(kind: str, tmp_path: Path) -> None:
    base = _base(kind)
    _, targets, family, idwt = CASES[kind]
    model = unipeft.apply(
        copy.deepcopy(base), "waveft", n_frequency=70, scaling=4.0, wavelet_family=family,
        use_idwt=idwt, random_loc_seed=9, targets=targets,
    ).eval()  # fmt: skip
    randn_(list(model.deltas.parameters()), 3)
    expected = _run(model, kind)
    assert (expected - _run(base, kind)).abs().max() > 1e-2
    interop.save(model, tmp_path)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    close(_run(ref, kind), expected, f"waveft {kind} ({family}) to PEFT")
    model.merge()
    merged_diff(model.base_model, ref.merge_and_unload(), f"waveft {kind} ({family}) to PEFT")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"wavelet_family": "coif1"}, "wavelet_family='coif1'"),
        ({"proportional_parameters": True}, "proportional_parameters"),
        ({"n_frequency_pattern": {"query": 30}}, "n_frequency_pattern"),
    ],
)
def test_peft_fields_unipeft_cannot_honour(change: dict, fragment: str, tmp_path: Path) -> None:
    base = _base("bert")
    config = peft.WaveFTConfig(n_frequency=20, target_modules=["query"])
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(str(tmp_path))
    path = tmp_path / interop.CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(unipeft.LoadError, match=fragment):
        interop.load(copy.deepcopy(base), tmp_path)
