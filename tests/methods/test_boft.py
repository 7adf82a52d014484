"""BOFT: ``W' = s ⊙ (W Mᵀ)``, ``M`` a product of butterfly-permuted block-diagonal
orthogonal factors; PEFT folders both ways on BERT and a timm ViT (its patch-embedding
Conv2d included), merged weights included, with one and several butterfly factors; the
fused-slice maths against a dense ``M`` built from PEFT's own permutations; the fast path
against the hook path; dropout; the refusals.

PEFT builds more than one butterfly factor only with its CUDA extension (a block-diagonal
kernel); :class:`_BlockDiag` stands in for it here, in plain torch, so that PEFT runs them
on the CPU. Every comparison starts both libraries from ``copy.deepcopy`` of one random
backbone, and the adapters are moved far from the identity before anything is compared."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

import peft.tuners.boft.layer as peft_boft  # noqa: E402
from _parity_ortho import base as _base  # noqa: E402
from _parity_ortho import close as _close  # noqa: E402
from _parity_ortho import (  # noqa: E402
    from_peft,
    randomise,
    report,
    to_peft,
)
from _parity_ortho import max_diff as _diff  # noqa: E402

import unipeft  # noqa: E402
from unipeft import AdapterError, ConfigError, LoadError  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402
from unipeft.testing.backbones import BACKBONES  # noqa: E402

CASES = {
    # kind: (PEFT target_modules, unipeft targets)
    "bert": (
        ["query", "value", "output.dense"],
        [
            r"encoder\.layer\.\d+\.attention\.self\.(query|value)",
            r"encoder\.layer\.\d+\.(attention\.)?output\.dense",
        ],
    ),
    "vit": (
        ["qkv", "fc1", "patch_embed.proj"],
        [r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.mlp\.fc1", r"patch_embed\.proj"],
    ),
}
CONFIGS: dict[str, dict[str, Any]] = {
    "plain": dict(boft_block_size=4),
    "butterfly": dict(boft_block_size=4, boft_n_butterfly_factor=3),
    "block_num": dict(boft_block_num=8, boft_n_butterfly_factor=2),
}
FAST = {("vit", "butterfly"), ("bert", "block_num"), ("bert", "plain")}
PAIRS = [
    pytest.param(kind, config, marks=() if (kind, config) in FAST else pytest.mark.slow)
    for kind in sorted(CASES)
    for config in sorted(CONFIGS)
]


class _BlockDiag:
    """PEFT's CUDA block-diagonal kernel in plain torch: ``(N, D, H, H) -> (N, DH, DH)``."""

    @staticmethod
    def forward(x: Tensor) -> list[Tensor]:
        return [torch.stack([torch.block_diag(*level.unbind(0)) for level in x.unbind(0)])]

    @staticmethod
    def backward(grad: Tensor, x: Tensor) -> list[Tensor]:
        _, d, h, _ = x.shape
        blocks = [grad[:, i * h : (i + 1) * h, i * h : (i + 1) * h] for i in range(d)]
        return [torch.stack(blocks, dim=1)]


@pytest.fixture(autouse=True)
def _peft_block_diag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peft_boft, "_FBD_CUDA", _BlockDiag())


_randomise = partial(randomise, scale=0.3)


def _peft_config(cfg: dict[str, Any], targets: list[str]) -> Any:
    fields = {"boft_block_size": 0, "boft_block_num": 0, **cfg}
    return peft.BOFTConfig(target_modules=targets, **fields)


@pytest.mark.parametrize(("kind", "config"), PAIRS)
def test_peft_to_unipeft(kind: str, config: str, tmp_path: Path) -> None:
    cfg = CONFIGS[config]
    theirs, ours, expected = from_peft(
        _base(kind), kind, _peft_config(cfg, CASES[kind][0]), tmp_path, noise="boft_",
        scale=0.3, floor=1e-2,
    )  # fmt: skip
    factors = {p.shape[0] for n, p in theirs.named_parameters() if "boft_R" in n}
    assert factors == {cfg.get("boft_n_butterfly_factor", 1)}
    loaded = ours.adapters["default"].config.model_dump()
    assert {k: loaded[k] for k in cfg} == cfg
    report(ours, kind, expected, theirs, ours, "PEFT -> unipeft", f"boft {kind}/{config}")


@pytest.mark.parametrize(("kind", "config"), PAIRS)
def test_unipeft_to_peft(kind: str, config: str, tmp_path: Path) -> None:
    cfg = CONFIGS[config]
    theirs, ours, expected, saved = to_peft(
        _base(kind), kind, "boft", CASES[kind][1], cfg, tmp_path, scale=0.3, floor=1e-2
    )
    assert saved["peft_type"] == "BOFT"
    assert saved["boft_block_size"] == cfg.get("boft_block_size", 0)
    assert saved["boft_block_num"] == cfg.get("boft_block_num", 0)
    report(theirs, kind, expected, theirs, ours, "unipeft -> PEFT", f"boft {kind}/{config}")


def test_fused_slice_is_the_dense_butterfly() -> None:
    """On timm's fused qkv, attn.v's rows become ``s ⊙ W_v Mᵀ`` with ``M`` built densely
    from PEFT's own butterfly permutations; q and k rows are untouched."""
    vit = BACKBONES["timm_vit"].make()
    model = unipeft.apply(
        vit, "boft", boft_block_size=4, boft_n_butterfly_factor=3, targets=["attn.v[0]"]
    )
    _randomise(model.deltas.parameters(), seed=3)
    delta = next(iter(model.deltas["default"].values()))
    a = delta.blocks.detach().double()
    skew = 0.5 * (a - a.transpose(-1, -2))
    eye4 = torch.eye(4, dtype=torch.float64)
    rot = torch.linalg.solve(eye4 + skew, eye4 - skew, left=False)
    n, m = 32, 3
    dense = torch.eye(n, dtype=torch.float64)
    for j in range(m):
        perm = peft_boft.BOFTLayer.block_butterfly_perm(None, n, 8 // 2**j, 2, m - 1)
        p = torch.zeros(n, n, dtype=torch.float64)
        p[torch.arange(n), perm] = 1.0
        dense = p @ torch.block_diag(*rot[j].unbind(0)) @ p.t() @ dense
    qkv = vit.blocks[0].attn.qkv
    e = qkv.in_features
    before = qkv.weight.detach().clone()
    x = BACKBONES["timm_vit"].sample(0)
    unmerged = BACKBONES["timm_vit"].run(model, x).detach()
    model.merge()
    after = qkv.weight.detach()
    want = delta.scale.detach().double()[:, None] * (before[2 * e :].double() @ dense.t())
    assert _diff(after[2 * e :].double(), want) < 1e-6
    assert torch.equal(after[: 2 * e], before[: 2 * e]), "q and k rows changed"
    _close(BACKBONES["timm_vit"].run(model, x).detach(), unmerged, "merged vs unmerged")
    model.unmerge()
    assert torch.equal(qkv.weight.detach(), before)


@pytest.mark.parametrize("transposed", [False, True])
def test_fast_path_matches_the_hook_path(transposed: bool) -> None:
    """``fused_linear`` (the only delta on a whole Linear or GPT-2 Conv1D) gives the hook
    path's output and the same gradients."""
    name = "gpt2" if transposed else "bert"
    model = unipeft.apply(
        BACKBONES[name].make(), "boft", boft_block_size=4, boft_n_butterfly_factor=2,
        targets=["attn.out"],
    )  # fmt: skip
    _randomise(model.deltas.parameters(), seed=6)
    att = model.adapters["default"].attachments[0]
    delta, module = att.delta, att.site.module
    assert att.fast is delta, "BOFT should implement FastPath"
    x = torch.randn(3, 5, module.weight.shape[0 if transposed else 1], requires_grad=True)
    fused = delta.fused_linear(x, module.weight, module.bias, transposed)
    plain = delta(x, type(module).forward(module, x))
    _close(fused, plain, "fused vs hook path")
    g = torch.randn(fused.shape)
    params = [delta.blocks, delta.scale, x]
    for a, b in zip(
        torch.autograd.grad((fused * g).sum(), params),
        torch.autograd.grad((plain * g).sum(), params),
    ):
        _close(a, b, "gradients")


def test_dropout_drops_blocks_of_one_factor_in_training() -> None:
    model = unipeft.apply(
        BACKBONES["bert"].make(), "boft", boft_block_size=4, boft_n_butterfly_factor=2,
        boft_dropout=0.5, targets=["attn.out"],
    )  # fmt: skip
    _randomise(model.deltas.parameters(), seed=8)
    delta = model.adapters["default"].attachments[0].delta
    eye = torch.eye(4)
    model.train()
    r = delta.rotations(drop=True)
    identity = [sum(bool(torch.equal(b, eye)) for b in level) for level in r]
    assert sorted(identity) == [0, 4], "half of one factor's 8 blocks should be the identity"
    model.eval()
    assert not any(torch.equal(b, eye) for level in delta.rotations() for b in level)


def test_sizes_and_refusals(tmp_path: Path) -> None:
    bert = BACKBONES["bert"].make()
    with pytest.raises(ConfigError, match=r"boft_block_size=3 .*Valid boft_block_size: 2, 4"):
        unipeft.apply(copy.deepcopy(bert), "boft", boft_block_size=3)
    with pytest.raises(ConfigError, match=r"multiple of 2\^4.*boft_n_butterfly_factor <= 4"):
        unipeft.apply(copy.deepcopy(bert), "boft", boft_block_size=4, boft_n_butterfly_factor=5)
    with pytest.raises(ConfigError, match=r"boft_block_num=5 .*boft_block_num: 1, 2, 4, 8, 16"):
        unipeft.apply(copy.deepcopy(bert), "boft", boft_block_num=5)
    with pytest.raises(ConfigError, match=r"exactly one of 'boft_block_size'.*'boft_block_num'"):
        unipeft.apply(copy.deepcopy(bert), "boft", boft_block_size=4, boft_block_num=8)
    cfg = unipeft.get_method("boft").config(boft_block_num=8)  # clears the default block size
    assert cfg.boft_block_size is None
    gpt2 = BACKBONES["gpt2"].make()  # Conv1D: fine in unipeft, not expressible in PEFT's BOFT
    model = unipeft.apply(gpt2, "boft", boft_block_size=4, targets=["attn.out"])
    with pytest.raises(AdapterError, match="Conv1D"):
        interop.save(model, tmp_path / "gpt2")
    conv = nn.Sequential(nn.Conv2d(4, 6, (3, 1), padding=(1, 0)))
    model = unipeft.apply(conv, "boft", boft_block_size=4, targets=["0"])
    with pytest.raises(AdapterError, match=r"kernel \(3, 1\)"):
        interop.save(model, tmp_path / "conv")
    vit = _base("vit")
    theirs = peft.get_peft_model(
        copy.deepcopy(vit), peft.BOFTConfig(target_modules=["fc1"], boft_block_size=4, bias="all")
    )
    theirs.save_pretrained(tmp_path / "bias")
    with pytest.raises(LoadError, match="bias"):
        interop.load(copy.deepcopy(vit), tmp_path / "bias")
