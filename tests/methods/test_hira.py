"""HiRA: ``ΔW = W ⊙ (B A)`` read from the live weight, on every projection layout; PEFT
folders both ways on BERT and a timm ViT (its patch-embedding convolution included, and
GPT-2's Conv1D), merged weights included.

Every comparison starts both libraries from ``copy.deepcopy`` of one random backbone."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from _parity import base as _base  # noqa: E402
from _parity import close_and_moved as _close  # noqa: E402
from _parity import max_diff as _diff  # noqa: E402
from _parity import run as _run  # noqa: E402

import unipeft  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402
from unipeft.methods.reparameterized.hira import HiraDelta  # noqa: E402
from unipeft.testing.backbones import BACKBONES  # noqa: E402

CASES = {
    # kind: (PEFT target_modules, unipeft targets)
    "bert": (
        ["query", "value", "intermediate.dense"],
        [r"encoder\.layer\.\d+\.attention\.self\.(query|value)", r".*intermediate\.dense"],
    ),
    "vit": (
        ["qkv", "fc1", "patch_embed.proj"],
        [r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.mlp\.fc1", r"patch_embed\.proj"],
    ),
    "gpt2": (["c_attn", "c_fc"], [r"h\.\d+\.attn\.c_attn", r"h\.\d+\.mlp\.c_fc"]),
}


def _randomise(params: list[tuple[str, nn.Parameter]], seed: int) -> None:
    """Standard normal factors: ``B A`` of order 1, so ``W ⊙ B A`` is of the order of ``W``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in params:
            p.copy_(torch.randn(p.shape, generator=g))


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _max_weight_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(_diff(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the maths


def test_identity_at_init_and_the_hadamard_update() -> None:
    base = _base("bert")
    model = unipeft.apply(copy.deepcopy(base), "hira", r=3)
    assert torch.equal(_run(model, "bert"), _run(base, "bert"))
    delta = model.adapters["default"].attachments[0].delta
    assert isinstance(delta, HiraDelta)
    _randomise(list(delta.named_parameters()), 1)
    w, b = delta.site.weight_views()
    dw = w * (delta.B @ delta.A)
    x, y = torch.randn(5, 32), torch.randn(5, 32)
    torch.testing.assert_close(delta.delta_weight(), dw, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(delta(x, y), y + x @ dw.t(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(delta.merged(w, b)[0], w + dw, atol=1e-6, rtol=1e-6)


def test_every_layout_merges_and_nothing_is_refused() -> None:
    """Conv (timm's patch embedding), fused slices, Conv1D, MHA in_proj slices."""
    for name, targets in (
        ("timm_vit", ["attn.q", "attn.v", "embed"]),
        ("gpt2", ["attn.q", "attn.v", "mlp.up"]),
        ("open_clip", ["attn.q", "attn.k", "attn.v"]),
    ):
        bb = BACKBONES[name]
        model = unipeft.apply(bb.make(), "hira", r=2, targets=targets)
        assert len(model.adapters["default"].sites) >= len(targets)
        _randomise(list(model.deltas.named_parameters()), 2)
        with torch.no_grad():
            x = bb.sample(0)
            before = bb.run(model, x)
            model.merge()
            merged = bb.run(model, x)
        torch.testing.assert_close(merged, before, atol=1e-5, rtol=1e-4)


def test_rank_above_the_site_is_refused_naming_r() -> None:
    with pytest.raises(unipeft.ConfigError, match=r"r=33 .*Choose r <= 32"):
        unipeft.apply(BACKBONES["bert"].make(), "hira", r=33)
    with pytest.raises(unipeft.ConfigError, match="'init'"):
        unipeft.apply(BACKBONES["bert"].make(), "hira", init="orthogonal")


# ----------------------------------------------------------------------------- PEFT parity


@pytest.mark.parametrize("kind", ["bert", "vit", "gpt2"])
def test_peft_to_unipeft(kind: str, tmp_path: Path) -> None:
    base = _base(kind)
    config = peft.HiraConfig(r=3, target_modules=CASES[kind][0])
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    _randomise([(n, p) for n, p in theirs.named_parameters() if "hira_" in n], 3)
    theirs.save_pretrained(str(tmp_path))
    ours = interop.load(copy.deepcopy(base), tmp_path).eval()
    assert ours.adapters["default"].method.id == "hira"
    _close(_run(ours, kind), _run(theirs, kind), _run(base, kind), f"hira PEFT->unipeft {kind}")
    # merged weights: PEFT's merge_and_unload against unipeft's merge
    ours.merge()
    merged = theirs.merge_and_unload()
    d = _max_weight_diff(_weights(ours.base_model), _weights(merged))
    print(f"hira merged weights {kind}: max abs diff {d:.3e}")
    assert d <= 1e-6


@pytest.mark.parametrize("kind", ["bert", "vit", "gpt2"])
def test_unipeft_to_peft(kind: str, tmp_path: Path) -> None:
    base = _base(kind)
    ours = unipeft.apply(
        copy.deepcopy(base), "hira", r=3, init="gaussian", targets=CASES[kind][1]
    ).eval()
    _randomise(list(ours.deltas.named_parameters()), 4)
    interop.save(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert theirs.peft_config["default"].init_weights == "gaussian"
    _close(_run(theirs, kind), _run(ours, kind), _run(base, kind), f"hira unipeft->PEFT {kind}")


def test_fused_slices_cannot_be_written_as_peft(tmp_path: Path) -> None:
    model = unipeft.apply(_base("vit"), "hira", r=2, targets=["attn.q"])
    with pytest.raises(unipeft.AdapterError, match="slice of the fused module"):
        interop.save(model, tmp_path)
