"""HRA: ``W' = W H``, ``H`` a product of ``r`` Householder reflections (or ``I - 2 Q Qᵀ`` with
Gram–Schmidt); PEFT folders both ways on BERT and a timm ViT (its patch-embedding Conv2d
included), merged weights included; the maths against the explicit product on a fused
slice; the refusals.

Every comparison starts both libraries from ``copy.deepcopy`` of one random backbone, and
the adapters are moved far from the identity before anything is compared."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

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


def _base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return transformers.BertModel(cfg).eval()
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
        depth=2, num_heads=2, num_classes=5, drop_rate=0.0,
    ).eval()  # fmt: skip


def _run(model: nn.Module, kind: str) -> Tensor:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if kind == "vit":
            return model(torch.randn(2, 3, 32, 32, generator=g))
        return model(input_ids=torch.randint(0, 100, (2, 7), generator=g)).last_hidden_state


def _randomise(params: Any, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)


def _diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def _close(a: Tensor, b: Tensor, what: str) -> float:
    d = _diff(a, b)
    scale = max(1.0, b.abs().max().item())
    assert d <= 1e-5 * scale, f"{what}: largest difference {d:.3e} (output scale {scale:.3g})"
    return d


def _merged_weights(peft_model: Any, ours: unipeft.DeltaModel) -> float:
    """Largest difference between PEFT's merge_and_unload() and unipeft's merge()."""
    ours.merge()
    mine = ours.base_model.state_dict()
    theirs = peft_model.merge_and_unload().state_dict()
    assert set(mine) == set(theirs)
    return max(_close(mine[k], theirs[k], f"merged {k}") for k in mine)


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(CASES))
def test_peft_to_unipeft(kind: str, config: str, tmp_path: Path) -> None:
    cfg = CONFIGS[config]
    base = _base(kind)
    pcfg = peft.HRAConfig(r=cfg["r"], apply_GS=cfg["apply_gs"], target_modules=CASES[kind][0])
    theirs = peft.get_peft_model(copy.deepcopy(base), pcfg).eval()
    _randomise((p for n, p in theirs.named_parameters() if "hra_u" in n), seed=1)
    theirs.save_pretrained(tmp_path)
    expected = _run(theirs, kind)
    assert _diff(expected, _run(base, kind)) > 1e-3, "the PEFT adapter is the identity"
    ours = interop.load(copy.deepcopy(base), tmp_path).eval()
    loaded = ours.adapters["default"].config
    assert (loaded.r, loaded.apply_gs) == (cfg["r"], cfg["apply_gs"])  # type: ignore[attr-defined]
    d = _close(_run(ours, kind), expected, "PEFT -> unipeft output")
    m = _merged_weights(theirs, ours)
    print(f"\nhra {kind}/{config} PEFT->unipeft: output {d:.2e}, merged weights {m:.2e}")


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(CASES))
def test_unipeft_to_peft(kind: str, config: str, tmp_path: Path) -> None:
    cfg = CONFIGS[config]
    base = _base(kind)
    ours = unipeft.apply(copy.deepcopy(base), "hra", targets=CASES[kind][1], **cfg).eval()
    _randomise(ours.deltas.parameters(), seed=2)
    expected = _run(ours, kind)
    assert _diff(expected, _run(base, kind)) > 1e-3, "the unipeft adapter is the identity"
    interop.save(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "HRA" and saved["r"] == cfg["r"]
    assert saved["apply_GS"] == cfg["apply_gs"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    d = _close(_run(theirs, kind), expected, "unipeft -> PEFT output")
    m = _merged_weights(theirs, ours)
    print(f"\nhra {kind}/{config} unipeft->PEFT: output {d:.2e}, merged weights {m:.2e}")


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
