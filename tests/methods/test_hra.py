"""HRA: ``W' = W H``, ``H`` a product of ``r`` Householder reflections (or ``I - 2 Q Qᵀ`` with
Gram–Schmidt); PEFT folders both ways on BERT and a timm ViT (its patch-embedding Conv2d
included), merged weights included; the maths against the explicit product on a fused
slice; the refusals.

Every comparison starts both libraries from ``copy.deepcopy`` of one random backbone, and
the adapters are moved far from the identity before anything is compared."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from _parity_ortho import base as _base  # noqa: E402
from _parity_ortho import (  # noqa: E402
    from_peft,
    report,
    to_peft,
)
from _parity_ortho import max_diff as _diff  # noqa: E402
from _parity_ortho import randomise as _randomise  # noqa: E402

import unipeft  # noqa: E402
from unipeft import AdapterError, ConfigError, LoadError  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402
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
}
CONFIGS = {"plain": dict(r=4, apply_gs=False), "gs": dict(r=3, apply_gs=True)}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(CASES))
def test_peft_to_unipeft(kind: str, config: str, tmp_path: Path) -> None:
    cfg = CONFIGS[config]
    pcfg = peft.HRAConfig(r=cfg["r"], apply_GS=cfg["apply_gs"], target_modules=CASES[kind][0])
    theirs, ours, expected = from_peft(_base(kind), kind, pcfg, tmp_path, noise="hra_u")
    loaded = ours.adapters["default"].config
    assert (loaded.r, loaded.apply_gs) == (cfg["r"], cfg["apply_gs"])  # type: ignore[attr-defined]
    report(ours, kind, expected, theirs, ours, "PEFT -> unipeft", f"hra {kind}/{config}")


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(CASES))
def test_unipeft_to_peft(kind: str, config: str, tmp_path: Path) -> None:
    cfg = CONFIGS[config]
    theirs, ours, expected, saved = to_peft(_base(kind), kind, "hra", CASES[kind][1], cfg, tmp_path)
    assert saved["peft_type"] == "HRA" and saved["r"] == cfg["r"]
    assert saved["apply_GS"] == cfg["apply_gs"]
    report(theirs, kind, expected, theirs, ours, "unipeft -> PEFT", f"hra {kind}/{config}")


@pytest.mark.parametrize("apply_gs", [False, True])
def test_fused_slice_is_the_explicit_product(apply_gs: bool) -> None:
    """On timm's fused qkv, attn.v's rows of the weight are multiplied by the product of the
    normalised reflections, built here one matrix at a time."""
    vit = BACKBONES["timm_vit"].make()
    model = unipeft.apply(vit, "hra", r=3, apply_gs=apply_gs, targets=["attn.v"])
    _randomise(model.deltas.parameters(), seed=3)
    delta = model.adapters["default"].delta_at("blocks.0:attn.v")
    u = delta.u.detach().double()
    cols: list[Tensor] = []
    for i in range(u.shape[1]):
        v = u[:, i]
        if apply_gs:
            for c in cols:
                v = v - (c @ v) * c
        cols.append(v / v.norm())
    eye = torch.eye(u.shape[0], dtype=torch.float64)
    if apply_gs:
        q = torch.stack(cols, 1)
        h = eye - 2 * q @ q.t()
    else:
        h = eye
        for c in cols:
            h = h @ (eye - 2 * torch.outer(c, c))
    qkv = vit.blocks[0].attn.qkv
    e = qkv.in_features
    w_v = qkv.weight.detach()[2 * e :].double()
    model.merge()
    merged = qkv.weight.detach()
    assert _diff(merged[2 * e :].double(), w_v @ h) < 1e-5
    model.unmerge()
    assert torch.equal(qkv.weight.detach()[: 2 * e], merged[: 2 * e]), "q and k rows changed"


def test_symmetric_init_is_the_identity_and_odd_r_is_not() -> None:
    method = unipeft.get_method("hra")
    for fields, identity in (
        ({"r": 4}, True),
        ({"r": 3}, False),
        ({"r": 4, "apply_gs": True}, False),
    ):
        assert method.is_identity_at_init(method.config(**fields)) is identity
    bert = BACKBONES["bert"].make()
    model = unipeft.apply(copy.deepcopy(bert), "hra", r=4)
    x = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        got = model(input_ids=x).last_hidden_state
        assert _diff(got, bert(input_ids=x).last_hidden_state) < 1e-5
    _randomise(model.deltas.parameters(), seed=4)
    with torch.no_grad():
        assert _diff(model(input_ids=x).last_hidden_state, got) > 1e-3


def test_refusals(tmp_path: Path) -> None:
    bert = BACKBONES["bert"].make()
    with pytest.raises(ConfigError, match=r"r=33 .*Choose r <= 32"):
        unipeft.apply(bert, "hra", r=33)
    with pytest.raises(ConfigError, match="r"):
        unipeft.apply(bert, "hra", r=0)
    gpt2 = BACKBONES["gpt2"].make()  # Conv1D: fine in unipeft, not expressible in PEFT's HRA
    model = unipeft.apply(gpt2, "hra", r=2, targets=["attn.out"])
    with pytest.raises(AdapterError, match="Conv1D"):
        interop.save(model, tmp_path / "gpt2")
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(unipeft.UnipeftError, match="'0' is a module site"):
        unipeft.apply(conv, "hra", r=2, targets=["0"])
    folder = tmp_path / "bias"
    folder.mkdir()
    vit = _base("vit")
    theirs = peft.get_peft_model(
        copy.deepcopy(vit), peft.HRAConfig(r=2, target_modules=["fc1"], bias="all")
    )
    theirs.save_pretrained(folder)
    with pytest.raises(LoadError, match="bias"):
        interop.load(copy.deepcopy(vit), folder)
