"""RandLoRA: parity with Hugging Face PEFT's RANDLORA both ways (BERT and a timm ViT), merged
weights, the shared bases (drawn from the seed as PEFT draws them, saved once), refusals."""

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
from unipeft.methods.reparameterized.randlora import RandLoraBases  # noqa: E402

# PEFT module names, and the same modules as unipeft targets (generic sites, by path)
CASES = {
    "bert": (
        ["query", "intermediate.dense", "output.dense"],
        [r".*self\.query", r".*intermediate\.dense", r".*output\.dense"],
    ),
    "vit": (["qkv", "fc1", "fc2"], [r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.mlp\.fc(1|2)"]),
}


def peft_model(base: nn.Module, arch: str, **kw) -> nn.Module:
    config = peft.RandLoraConfig(
        r=5, randlora_alpha=10, target_modules=CASES[arch][0], projection_prng_key=3, **kw
    )
    model = peft.get_peft_model(base, config).eval()
    randomise(p for p in model.parameters() if p.requires_grad)
    return model


@pytest.mark.parametrize(
    ("arch", "bases"),
    [("bert", "dense"), ("vit", "dense"), ("bert", "sparse"), ("vit", "very_sparse")],
)
def test_from_peft(arch: str, bases: str, tmp_path: Path) -> None:
    base = make(arch)
    flags = {"sparse": bases == "sparse", "very_sparse": bases == "very_sparse"}
    theirs = peft_model(copy.deepcopy(base), arch, **flags)
    theirs.save_pretrained(str(tmp_path))
    expected = run(theirs, arch)
    assert (expected - run(base, arch)).abs().max() > 1e-2  # not the identity
    ours = interop.load(copy.deepcopy(base), tmp_path)
    adapter = ours.adapters["default"]
    assert adapter.method.id == "randlora" and adapter.config.bases == bases
    assert adapter.config.alpha == 10 and adapter.config.projection_seed == 3
    close(run(ours, arch), expected, f"{arch} ({bases}) PEFT -> unipeft")
    ours.merge()
    merged = theirs.merge_and_unload().state_dict()
    worst = max((ours.base_model.state_dict()[k] - v).abs().max().item() for k, v in merged.items())
    print(f"{arch} ({bases}) merged weights: max |diff| = {worst:.3e}")
    assert worst <= 1e-5


@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_to_peft(arch: str, tmp_path: Path) -> None:
    base = make(arch)
    ours = unipeft.apply(
        copy.deepcopy(base), "randlora", r=6, alpha=12.0, projection_seed=5,
        targets=CASES[arch][1],
    ).eval()  # fmt: skip
    randomise(ours.deltas.parameters())
    expected = run(ours, arch)
    assert (expected - run(base, arch)).abs().max() > 1e-2
    interop.save(ours, tmp_path)
    keys = set(load_file(tmp_path / interop.WEIGHTS_FILE))
    assert {"base_model.randlora_A", "base_model.randlora_B"} <= keys
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    close(run(theirs, arch), expected, f"{arch} unipeft -> PEFT")


def test_to_peft_without_projections_redraws_them_from_the_seed(tmp_path: Path) -> None:
    base = make("vit")
    ours = unipeft.apply(
        copy.deepcopy(base), "randlora", r=4, alpha=8.0, bases="sparse", save_projection=False,
        projection_seed=9, targets=CASES["vit"][1],
    ).eval()  # fmt: skip
    randomise(ours.deltas.parameters())
    interop.save(ours, tmp_path)
    assert not any("randlora_A" in k for k in load_file(tmp_path / interop.WEIGHTS_FILE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it relies on the PRNG key
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    close(run(theirs, "vit"), run(ours, "vit"), "vit unipeft -> PEFT, bases redrawn")


@pytest.mark.parametrize("bases", ["dense", "sparse", "very_sparse"])
def test_bases_are_drawn_from_the_seed_as_peft_draws_them(bases: str) -> None:
    flags = {"sparse": bases == "sparse", "very_sparse": bases == "very_sparse"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            make("bert"),
            peft.RandLoraConfig(
                r=3, target_modules=CASES["bert"][0], projection_prng_key=11, **flags
            ),
        )
    mine = RandLoraBases(3, 64, 64, seed=11, bases=bases)  # (max d_in, max d_out)
    assert torch.equal(mine.A, theirs.base_model.randlora_A["default"])
    assert torch.equal(mine.B, theirs.base_model.randlora_B["default"])
    assert not torch.equal(RandLoraBases(3, 64, 64, seed=12, bases=bases).B, mine.B)


def test_saves_each_shared_tensor_once_and_loads_back(tmp_path: Path) -> None:
    ours = unipeft.apply(make("vit"), "randlora", r=4, targets=["attn.q", "attn.v", "mlp.down"])
    randomise(ours.deltas.parameters())
    expected = run(ours, "vit")
    ours.save(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_FILE)
    shared = sorted(k for k in saved if "__shared__" in k)
    assert shared == ["default::__shared__::randlora.A", "default::__shared__::randlora.B"]
    # sites up to 128 -> 32: m = 32, M = 128, n = 32 / 4 bases
    assert saved[shared[0]].shape == (4, 1, 32) and saved[shared[1]].shape == (128, 8, 4)
    per_site = [k.rsplit(".", 1)[1] for k in saved if "__shared__" not in k]
    assert set(per_site) == {"lam", "gamma"} and len(per_site) == 2 * 6
    loaded = unipeft.load(make("vit"), tmp_path)
    assert torch.equal(run(loaded, "vit"), expected)
    got = loaded.deltas["default"]["__shared__"]
    assert torch.equal(got.A, saved[shared[0]]) and torch.equal(got.B, saved[shared[1]])


def test_identity_at_init_and_counts() -> None:
    base = make("bert")
    model = unipeft.apply(copy.deepcopy(base), "randlora", r=5, targets=["attn.q", "mlp.up"])
    assert torch.equal(run(model, "bert"), run(base, "bert"))
    # per site n (r + m): m = 32, n = ceil(32 / 5) = 7
    assert model.num_trainable_parameters() == 4 * 7 * (5 + 32)
    shared = model.deltas["default"]["__shared__"]
    assert not any(p.requires_grad for p in shared.parameters())


def test_merge_on_fused_slices_matches_unmerged() -> None:
    model = unipeft.apply(make("vit"), "randlora", r=4, alpha=8.0, targets=["attn.k", "mlp.down"])
    randomise(model.deltas.parameters())
    unmerged = run(model, "vit")
    model.merge()
    close(run(model, "vit"), unmerged, "vit merged vs unmerged (qkv slices)")


def test_convolutions_are_refused() -> None:
    with pytest.raises(unipeft.TargetError, match=r"'patch_embed\.proj' is a convolution"):
        unipeft.apply(make("vit"), "randlora", targets=["embed"])


def test_from_peft_without_projections_redraws_them_from_the_seed(tmp_path: Path) -> None:
    base = make("bert")
    theirs = peft_model(copy.deepcopy(base), "bert", save_projection=False)
    theirs.save_pretrained(str(tmp_path))
    keys = load_file(tmp_path / interop.WEIGHTS_FILE)
    assert not any(k.startswith("base_model.randlora_") for k in keys)
    ours = interop.load(copy.deepcopy(base), tmp_path)
    close(run(ours, "bert"), run(theirs, "bert"), "bert PEFT -> unipeft, bases redrawn")
