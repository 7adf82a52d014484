"""VeRA: parity with Hugging Face PEFT's VERA both ways (BERT and a timm ViT), merged weights,
the shared projections (drawn from the seed as PEFT draws them, saved once), refusals."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

from _parity import close, make, randomise  # noqa: E402
from _parity import run_fixed as run  # noqa: E402

import unipeft  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402
from unipeft.features.saving import WEIGHTS_FILE  # noqa: E402
from unipeft.methods.reparameterized.vera import VeraProjections  # noqa: E402

# PEFT module names, and the same modules as unipeft targets (generic sites, by path)
CASES = {
    "bert": (
        ["query", "value", "intermediate.dense"],
        [r".*self\.(query|value)", r".*\.intermediate\.dense"],
    ),
    "vit": (["qkv", "fc1"], [r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.mlp\.fc1"]),
}


def peft_model(base: nn.Module, arch: str, **kw) -> nn.Module:
    config = peft.VeraConfig(r=4, target_modules=CASES[arch][0], projection_prng_key=3, **kw)
    model = peft.get_peft_model(base, config).eval()
    randomise(p for p in model.parameters() if p.requires_grad)
    return model


@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_from_peft(arch: str, tmp_path: Path) -> None:
    base = make(arch)
    theirs = peft_model(copy.deepcopy(base), arch, d_initial=0.2)
    theirs.save_pretrained(str(tmp_path))
    expected = run(theirs, arch)
    assert (expected - run(base, arch)).abs().max() > 1e-2  # not the identity
    ours = interop.load(copy.deepcopy(base), tmp_path)
    adapter = ours.adapters["default"]
    assert adapter.method.id == "vera" and adapter.config.projection_seed == 3
    close(run(ours, arch), expected, f"{arch} PEFT -> unipeft")
    # merged weights: PEFT's merge_and_unload and unipeft's merge write the same weights
    ours.merge()
    merged = theirs.merge_and_unload().state_dict()
    worst = max((ours.base_model.state_dict()[k] - v).abs().max().item() for k, v in merged.items())
    print(f"{arch} merged weights: max |diff| = {worst:.3e}")
    assert worst <= 1e-6


@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_to_peft(arch: str, tmp_path: Path) -> None:
    base = make(arch)
    ours = unipeft.apply(
        copy.deepcopy(base), "vera", r=6, projection_seed=5, targets=CASES[arch][1]
    )
    ours.eval()
    randomise(ours.deltas.parameters())
    expected = run(ours, arch)
    assert (expected - run(base, arch)).abs().max() > 1e-2
    interop.save(ours, tmp_path)
    keys = set(load_file(tmp_path / interop.WEIGHTS_FILE))
    assert {"base_model.vera_A", "base_model.vera_B"} <= keys
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    close(run(theirs, arch), expected, f"{arch} unipeft -> PEFT")


def test_to_peft_without_projections_redraws_them_from_the_seed(tmp_path: Path) -> None:
    base = make("bert")
    ours = unipeft.apply(
        copy.deepcopy(base), "vera", r=4, projection_seed=9, save_projection=False,
        targets=CASES["bert"][1],
    ).eval()  # fmt: skip
    randomise(ours.deltas.parameters())
    interop.save(ours, tmp_path)
    assert not any("vera_A" in k for k in load_file(tmp_path / interop.WEIGHTS_FILE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it relies on the PRNG key
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    close(run(theirs, "bert"), run(ours, "bert"), "bert unipeft -> PEFT, projections redrawn")


def test_projections_are_drawn_from_the_seed_as_peft_draws_them() -> None:
    base = make("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            base, peft.VeraConfig(r=4, target_modules=CASES["bert"][0], projection_prng_key=11)
        )
    mine = VeraProjections(4, 32, 64, seed=11)
    assert torch.equal(mine.A, theirs.base_model.vera_A["default"])
    assert torch.equal(mine.B, theirs.base_model.vera_B["default"])
    assert not torch.equal(VeraProjections(4, 32, 64, seed=12).A, mine.A)


def test_saves_each_shared_tensor_once_and_loads_back(tmp_path: Path) -> None:
    ours = unipeft.apply(make("bert"), "vera", r=4, targets=["attn.q", "attn.v", "mlp.up"])
    randomise(ours.deltas.parameters())
    expected = run(ours, "bert")
    ours.save(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_FILE)
    shared = sorted(k for k in saved if "__shared__" in k)
    assert shared == ["default::__shared__::vera.A", "default::__shared__::vera.B"]
    assert saved[shared[0]].shape == (4, 32) and saved[shared[1]].shape == (64, 4)
    per_site = [k.rsplit(".", 1)[1] for k in saved if "__shared__" not in k]
    assert set(per_site) == {"lambda_b", "lambda_d"} and len(per_site) == 2 * 6
    loaded = unipeft.load(make("bert"), tmp_path)
    assert torch.equal(run(loaded, "bert"), expected)
    got = loaded.deltas["default"]["__shared__"]
    assert torch.equal(got.A, saved[shared[0]]) and torch.equal(got.B, saved[shared[1]])


def test_identity_at_init_and_counts() -> None:
    base = make("vit")
    model = unipeft.apply(copy.deepcopy(base), "vera", r=4, targets=["attn.q", "attn.v", "mlp.up"])
    assert torch.equal(run(model, "vit"), run(base, "vit"))
    # per site r + d_out; the projections are frozen buffers, not counted
    assert model.num_trainable_parameters() == 2 * (2 * (4 + 32) + (4 + 128))
    shared = model.deltas["default"]["__shared__"]
    assert shared.A.shape == (4, 32) and shared.B.shape == (128, 4)
    assert not any(p.requires_grad for p in shared.parameters())


def test_convolutions_are_refused() -> None:
    with pytest.raises(unipeft.TargetError, match=r"'patch_embed\.proj' is a convolution"):
        unipeft.apply(make("vit"), "vera", r=4, targets=["embed"])


def test_from_peft_without_projections_redraws_them_from_the_seed(tmp_path: Path) -> None:
    base = make("bert")
    theirs = peft_model(copy.deepcopy(base), "bert", save_projection=False)
    theirs.save_pretrained(str(tmp_path))
    assert not any("vera_A" in k for k in load_file(tmp_path / interop.WEIGHTS_FILE))
    ours = interop.load(copy.deepcopy(base), tmp_path)
    close(run(ours, "bert"), run(theirs, "bert"), "bert PEFT -> unipeft, projections redrawn")
