"""OFT: ``W' = W Rᵀ``, ``R`` block-diagonal orthogonal (Cayley or Cayley-Neumann of skew
blocks); PEFT folders both ways on BERT and a timm ViT, merged weights included; 1x1 and
larger convolutions; the fused-slice maths against an explicit block-diagonal matrix; the
fast path against the hook path; COFT, block sharing, module dropout; the refusals.

Every comparison starts both libraries from ``copy.deepcopy`` of one random backbone, and
the adapters are moved far from the identity before anything is compared."""

from __future__ import annotations

import copy
import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from _parity_ortho import base as _base  # noqa: E402
from _parity_ortho import close as _close  # noqa: E402
from _parity_ortho import (  # noqa: E402
    from_peft,
    randomise,
    report,
    to_peft,
)
from _parity_ortho import max_diff as _diff  # noqa: E402
from _parity_ortho import merged_weights as _merged_weights  # noqa: E402

import unipeft  # noqa: E402
from unipeft import AdapterError, ConfigError, LoadError  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402
from unipeft.methods.reparameterized.oft import cayley, skew_symmetric  # noqa: E402
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
    "vit": (["qkv", "fc1"], [r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.mlp\.fc1"]),
}
CONFIGS: dict[str, dict[str, Any]] = {
    "neumann": dict(oft_block_size=8),
    "exact_shared": dict(r=4, use_cayley_neumann=False, block_share=True),
    "coft": dict(oft_block_size=4, coft=True, eps=2.0, num_cayley_neumann_terms=7),
}
FAST = {("bert", "neumann"), ("vit", "exact_shared"), ("bert", "coft")}
PAIRS = [
    pytest.param(kind, config, marks=() if (kind, config) in FAST else pytest.mark.slow)
    for kind in sorted(CASES)
    for config in sorted(CONFIGS)
]


_randomise = partial(randomise, scale=0.3)


def _peft_config(cfg: dict[str, Any], targets: list[str]) -> Any:
    fields = {"r": 0, "oft_block_size": 0, **cfg}
    return peft.OFTConfig(target_modules=targets, **fields)


@pytest.mark.parametrize(("kind", "config"), PAIRS)
def test_peft_to_unipeft(kind: str, config: str, tmp_path: Path) -> None:
    cfg = CONFIGS[config]
    theirs, ours, expected = from_peft(
        _base(kind), kind, _peft_config(cfg, CASES[kind][0]), tmp_path, noise="oft_R",
        scale=0.3, floor=1e-2,
    )  # fmt: skip
    loaded = ours.adapters["default"].config.model_dump()
    assert {k: loaded[k] for k in cfg} == cfg
    report(ours, kind, expected, theirs, ours, "PEFT -> unipeft", f"oft {kind}/{config}")


@pytest.mark.parametrize(("kind", "config"), PAIRS)
def test_unipeft_to_peft(kind: str, config: str, tmp_path: Path) -> None:
    cfg = CONFIGS[config]
    theirs, ours, expected, saved = to_peft(
        _base(kind), kind, "oft", CASES[kind][1], cfg, tmp_path, scale=0.3, floor=1e-2
    )
    assert saved["peft_type"] == "OFT"
    assert saved["r"] == cfg.get("r", 0) and saved["oft_block_size"] == cfg.get("oft_block_size", 0)
    report(theirs, kind, expected, theirs, ours, "unipeft -> PEFT", f"oft {kind}/{config}")


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 6, 1, stride=2), nn.Conv2d(6, 5, 3, padding=1)).eval()


def test_convolutions(tmp_path: Path) -> None:
    """A 1x1 Conv2d converts both ways; on a 3x3 one the function is PEFT's merged weight
    (its forward there folds overlapping patches and is not even the identity at init), so
    converting it is refused."""
    base = _convnet()
    x = torch.randn(2, 8, 9, 9, generator=torch.Generator().manual_seed(3))
    cfg = peft.OFTConfig(target_modules=["0", "1"], r=0, oft_block_size=2)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    _randomise((p for n, p in theirs.named_parameters() if "oft_R" in n), seed=4)
    theirs.save_pretrained(tmp_path / "peft")
    ours = unipeft.apply(copy.deepcopy(base), "oft", oft_block_size=2, targets=["0", "1"])
    mine = dict(ours.deltas["default"].items())
    for name, layer in (("0", theirs.base_model.model[0]), ("1", theirs.base_model.model[1])):
        with torch.no_grad():
            mine[name].skew.copy_(layer.oft_R["default"].weight)
    with torch.no_grad():
        got = ours(x)
        merged_peft = copy.deepcopy(theirs).merge_and_unload()(x)
    d = _close(got, merged_peft, "unipeft output vs PEFT's merged model")
    m = _merged_weights(theirs, ours)
    print(f"\noft conv 1x1+3x3: output vs PEFT merged {d:.2e}, merged weights {m:.2e}")
    ours.unmerge()
    with pytest.raises(AdapterError, match=r"kernel \(3, 3\).*folds"):
        interop.save(ours, tmp_path / "both")
    # the 1x1 convolution alone: PEFT's forward is its merged weight, both ways
    one = unipeft.apply(copy.deepcopy(base), "oft", oft_block_size=2, targets=["0"])
    _randomise(one.deltas.parameters(), seed=5)
    interop.save(one, tmp_path / "one")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "one").eval()
    with torch.no_grad():
        d = _close(back(x), one(x), "1x1 conv unipeft -> PEFT")
    again = interop.load(copy.deepcopy(base), tmp_path / "one")
    with torch.no_grad():
        _close(again(x), one(x), "1x1 conv PEFT -> unipeft")
    print(f"oft conv 1x1 unipeft->PEFT output {d:.2e}")
    with pytest.raises(LoadError, match=r"kernel \(3, 3\)"):
        interop.load(copy.deepcopy(base), tmp_path / "peft")


def test_fused_slice_is_the_explicit_rotation() -> None:
    """On timm's fused qkv, attn.v's rows of the weight become ``W_v Rᵀ`` with ``R`` the
    explicit block-diagonal matrix; q and k rows are untouched; merged equals unmerged."""
    vit = BACKBONES["timm_vit"].make()
    model = unipeft.apply(vit, "oft", oft_block_size=8, targets=["attn.v[0]"])
    _randomise(model.deltas.parameters(), seed=3)
    delta = next(iter(model.deltas["default"].values()))
    skew = delta.skew.detach().double()
    r = cayley(skew_symmetric(skew, 8), 5)
    dense = torch.block_diag(*r.unbind(0))
    qkv = vit.blocks[0].attn.qkv
    e = qkv.in_features
    before = qkv.weight.detach().clone()
    x = BACKBONES["timm_vit"].sample(0)
    unmerged = BACKBONES["timm_vit"].run(model, x).detach()
    model.merge()
    after = qkv.weight.detach()
    assert _diff(after[2 * e :].double(), before[2 * e :].double() @ dense.t()) < 1e-6
    assert torch.equal(after[: 2 * e], before[: 2 * e]), "q and k rows changed"
    _close(BACKBONES["timm_vit"].run(model, x).detach(), unmerged, "merged vs unmerged")
    model.unmerge()
    assert torch.equal(qkv.weight.detach(), before)


@pytest.mark.parametrize("transposed", [False, True])
def test_fast_path_matches_the_hook_path(transposed: bool) -> None:
    """``fused_linear`` (the only delta on a whole Linear or GPT-2 Conv1D) gives the hook
    path's output and the same gradients."""
    if transposed:
        model = unipeft.apply(BACKBONES["gpt2"].make(), "oft", r=4, targets=["attn.out"])
    else:
        model = unipeft.apply(BACKBONES["bert"].make(), "oft", r=4, targets=["attn.out"])
    _randomise(model.deltas.parameters(), seed=6)
    att = model.adapters["default"].attachments[0]
    delta, module = att.delta, att.site.module
    assert att.fast is delta, "OFT should implement FastPath"
    x = torch.randn(3, 5, module.weight.shape[0 if transposed else 1], requires_grad=True)
    fused = delta.fused_linear(x, module.weight, module.bias, transposed)
    plain = delta(x, type(module).forward(module, x))
    _close(fused, plain, "fused vs hook path")
    g = torch.randn(fused.shape)
    gf = torch.autograd.grad((fused * g).sum(), [delta.skew, x])
    gp = torch.autograd.grad((plain * g).sum(), [delta.skew, x])
    for a, b in zip(gf, gp):
        _close(a, b, "gradients")


def test_cayley_is_orthogonal_and_coft_bounds_the_blocks() -> None:
    q = skew_symmetric(torch.randn(3, 6, dtype=torch.float64), 4)
    r = cayley(q)
    eye = torch.eye(4, dtype=torch.float64)
    assert _diff(r @ r.transpose(-1, -2), eye.expand_as(r)) < 1e-12
    model = unipeft.apply(BACKBONES["bert"].make(), "oft", r=4, coft=True, eps=0.1)
    _randomise(model.deltas.parameters(), seed=7, scale=1.0)
    BACKBONES["bert"].run(model, BACKBONES["bert"].sample(0))
    for delta in model.deltas["default"].values():
        norms = 2**0.5 * delta.skew.detach().norm(dim=1)
        assert (norms <= 0.1 / delta.skew.shape[0] ** 0.5 * (1 + 1e-5)).all()


def test_module_dropout_drops_blocks_in_training_only() -> None:
    bert = BACKBONES["bert"].make()
    model = unipeft.apply(bert, "oft", r=8, module_dropout=0.5, targets=["attn.out"])
    _randomise(model.deltas.parameters(), seed=8)
    delta = model.adapters["default"].attachments[0].delta
    eye = torch.eye(delta.block_size)
    model.train()
    r = delta.blocks(drop=True)
    identity = [bool(torch.equal(b, eye)) for b in r]
    assert sum(identity) == 4, "half of the 8 blocks should be the identity"
    x = torch.randn(2, 3, 32)
    y = F.linear(x, *delta.site.weight_views())
    model.eval()
    assert torch.equal(delta(x, y), delta(x, y)), "eval mode must be deterministic"


def test_sizes_and_refusals(tmp_path: Path) -> None:
    bert = BACKBONES["bert"].make()
    with pytest.raises(ConfigError, match=r"oft_block_size=5 .*Valid oft_block_size: 2, 4, 8"):
        unipeft.apply(copy.deepcopy(bert), "oft", oft_block_size=5)
    with pytest.raises(ConfigError, match=r"r=3 .*Valid r: 1, 2, 4, 8, 16"):
        unipeft.apply(copy.deepcopy(bert), "oft", r=3)
    with pytest.raises(ConfigError, match=r"r=32 .*at least 2"):
        unipeft.apply(copy.deepcopy(bert), "oft", r=32)
    with pytest.raises(ConfigError, match=r"exactly one of 'r'.*'oft_block_size'"):
        unipeft.apply(copy.deepcopy(bert), "oft", r=4, oft_block_size=8)
    cfg = unipeft.get_method("oft").config(r=4)  # r alone clears the default block size
    assert cfg.oft_block_size is None
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(unipeft.UnipeftError, match="'0' is a module site"):
        unipeft.apply(conv, "oft", oft_block_size=3, targets=["0"])
    gpt2 = BACKBONES["gpt2"].make()  # Conv1D: fine in unipeft, not expressible in PEFT's OFT
    model = unipeft.apply(gpt2, "oft", r=4, targets=["attn.out"])
    with pytest.raises(AdapterError, match="Conv1D"):
        interop.save(model, tmp_path / "gpt2")
    vit = _base("vit")
    for name, extra, match in (
        ("bias", dict(bias="all"), "bias"),
        ("adjusted", dict(oft_block_size=12), r"oft_block_size=12 .*separate adapter"),
    ):
        folder = tmp_path / name
        fields = {"r": 0, "oft_block_size": 8, **extra}
        theirs = peft.get_peft_model(
            copy.deepcopy(vit), peft.OFTConfig(target_modules=["fc1"], **fields)
        )
        theirs.save_pretrained(folder)
        with pytest.raises(LoadError, match=match):
            interop.load(copy.deepcopy(vit), folder)
    old = tmp_path / "adjusted" / "adapter_config.json"
    config = json.loads(old.read_text())
    config.update(oft_block_size=8, peft_version="0.17.1", use_cayley_neumann=True)
    old.write_text(json.dumps(config))
    with pytest.raises(LoadError, match=r"0\.18"):
        interop.load(copy.deepcopy(vit), tmp_path / "adjusted")
