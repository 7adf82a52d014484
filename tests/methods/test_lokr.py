"""LoKr: ``ΔW = s · W1 ⊗ W2`` with factor sizes that depend on the site's widths; PEFT
folders both ways on BERT, a timm ViT (its patch-embedding Conv2d included) and an
``nn.Conv1d`` stack (where PEFT's whole ``W2`` takes a path of its own), merged weights
included, the train-time dropouts against PEFT's under one seed, and the width split and
layout rules against PEFT's own.

Every comparison starts both libraries from ``copy.deepcopy`` of one random backbone."""

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

from _parity import max_diff as _diff  # noqa: E402
from _parity_spectral import (  # noqa: E402
    base,
    counts_identity_and_merge,
    run,
    train_mode_diff,
)
from _parity_spectral import close_lycoris as _close  # noqa: E402
from _parity_spectral import merged_weights as _merged_weights  # noqa: E402
from peft.tuners.lokr.layer import factorization  # noqa: E402  (the oracle)

import unipeft  # noqa: E402
from unipeft import ConfigError, LoadError  # noqa: E402
from unipeft.contract.deltas import ProjectionShape  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402
from unipeft.methods.reparameterized.lokr import (  # noqa: E402
    LokrConfig,
    LokrDelta,
    kron_layout,
    kron_split,
)
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
    "conv1d": (["0", "2"], [r"0", r"2"]),
}
CONFIGS = {
    # W1 whole, W2 a rank-2 product (flattened over the kernel on convolutions)
    "product": dict(r=2, alpha=3.0),
    # W1 a product where it is wide enough, W2 a Tucker product on convolutions
    "both_tucker": dict(r=2, alpha=5.0, decompose_both=True, use_effective_conv2d=True),
    # widths split by 4, W2 whole (on the Conv1d stack: PEFT's own Kronecker path)
    "whole_factor4": dict(r=8, alpha=2.0, decompose_factor=4),
}


class _Conv1dNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv1d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv1d(32, 8, 3, dilation=2)
        )


def _base(kind: str) -> nn.Module:
    return base(kind, _Conv1dNet)


def _run(model: nn.Module, kind: str) -> Tensor:
    return run(model, kind, 16)


def _peft_config(targets: list[str], cfg: dict[str, Any], **kw: Any) -> Any:
    factor = cfg.get("decompose_factor")
    return peft.LoKrConfig(
        r=cfg["r"],
        alpha=cfg["alpha"],
        decompose_both=cfg.get("decompose_both", False),
        use_effective_conv2d=cfg.get("use_effective_conv2d", False),
        decompose_factor=-1 if factor is None else factor,
        target_modules=targets,
        init_weights=False,  # every factor random: far from the identity
        **kw,
    )


# ----------------------------------------------------------------------------- PEFT parity


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(CASES))
def test_peft_to_unipeft(kind: str, config: str, tmp_path: Path) -> None:
    cfg = CONFIGS[config]
    base = _base(kind)
    theirs = peft.get_peft_model(copy.deepcopy(base), _peft_config(CASES[kind][0], cfg)).eval()
    theirs.save_pretrained(tmp_path)
    expected = _run(theirs, kind)
    assert _diff(expected, _run(base, kind)) > 1e-3, "the PEFT adapter is the identity"
    ours = interop.load(copy.deepcopy(base), tmp_path).eval()
    loaded = ours.adapters["default"].config
    assert loaded.decompose_factor == cfg.get("decompose_factor")  # type: ignore[attr-defined]
    d = _close(_run(ours, kind), expected, "PEFT -> unipeft output")
    m = _merged_weights(theirs, ours)
    print(f"\nlokr {kind}/{config} PEFT->unipeft: output {d:.2e}, merged weights {m:.2e}")


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(CASES))
def test_unipeft_to_peft(kind: str, config: str, tmp_path: Path) -> None:
    cfg = CONFIGS[config]
    base = _base(kind)
    ours = unipeft.apply(copy.deepcopy(base), "lokr", targets=CASES[kind][1], init="random", **cfg)
    ours.eval()
    expected = _run(ours, kind)
    assert _diff(expected, _run(base, kind)) > 1e-3, "the unipeft adapter is the identity"
    interop.save(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LOKR"
    assert saved["decompose_factor"] == cfg.get("decompose_factor", -1)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    d = _close(_run(theirs, kind), expected, "unipeft -> PEFT output")
    m = _merged_weights(theirs, ours)
    print(f"\nlokr {kind}/{config} unipeft->PEFT: output {d:.2e}, merged weights {m:.2e}")


def test_train_time_dropouts_match_peft_under_one_seed(tmp_path: Path) -> None:
    """rank_dropout (with rank_dropout_scale) and module_dropout draw the same random
    numbers in the same order as PEFT's: a training forward under one seed gives PEFT's
    output."""
    base = _base("bert")
    pc = _peft_config(
        CASES["bert"][0], CONFIGS["product"],
        rank_dropout=0.4, module_dropout=0.3, rank_dropout_scale=True,
    )  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(base), pc)
    theirs.save_pretrained(tmp_path)
    ours = interop.load(copy.deepcopy(base), tmp_path)
    assert ours.adapters["default"].config.rank_dropout_scale  # type: ignore[attr-defined]
    d = train_mode_diff(theirs, ours, "bert")
    print(f"\nlokr train-mode dropouts vs PEFT: {d:.2e}")


def test_init_lycoris_and_factor_round_trip_through_peft(tmp_path: Path) -> None:
    base = _base("bert")
    ours = unipeft.apply(
        copy.deepcopy(base), "lokr", targets=CASES["bert"][1], init="lycoris", r=2,
        decompose_factor=2,
    )  # fmt: skip
    torch.testing.assert_close(_run(ours, "bert"), _run(base, "bert"))  # identity at init
    interop.save(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_weights"] == "lycoris" and saved["decompose_factor"] == 2
    back = interop.load(copy.deepcopy(base), tmp_path).adapters["default"].config
    assert back == ours.adapters["default"].config


# ----------------------------------------------------------------------------- the layout


def test_width_split_is_peft_s() -> None:
    for width in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 7, 16, 0):
            ours = kron_split(width, None if factor == -1 else max(factor, 1))
            assert ours == factorization(width, factor), (width, factor)


@pytest.mark.parametrize("layer", ["linear", "conv2d", "conv1d", "conv2d_1x1"])
def test_layout_has_peft_s_tensors(layer: str) -> None:
    """For many ranks and options, unipeft's delta has exactly the tensors (names and
    shapes) of PEFT's layer, and the parameter formula counts them."""
    make = {
        "linear": lambda: nn.Linear(24, 36),
        "conv2d": lambda: nn.Conv2d(12, 20, 3),
        "conv1d": lambda: nn.Conv1d(16, 32, 3),
        "conv2d_1x1": lambda: nn.Conv2d(8, 12, 1),
    }[layer]
    for r in (1, 2, 3, 5, 9):
        for both, tucker, factor in ((False, False, -1), (True, True, -1), (True, False, 3)):
            module = nn.Sequential(make())
            pc = peft.LoKrConfig(
                r=r, target_modules=["0"], decompose_both=both, use_effective_conv2d=tucker,
                decompose_factor=factor,
            )  # fmt: skip
            peft_layer = peft.get_peft_model(module, pc).base_model.model[0]
            theirs = {
                n.removeprefix("lokr_"): tuple(getattr(peft_layer, n)["default"].shape)
                for n in peft_layer.adapter_layer_names
                if "default" in getattr(peft_layer, n)
            }
            if "t2" in theirs and layer == "conv1d":
                theirs["t2"] = theirs["t2"][:3]  # PEFT's (r, r, k, 1)
            cfg = LokrConfig(
                r=r, decompose_both=both, use_effective_conv2d=tucker,
                decompose_factor=None if factor == -1 else factor,
            )  # fmt: skip
            base = module[0].base_layer
            if isinstance(base, nn.Linear):
                shape = ProjectionShape(base.in_features, base.out_features)
            else:
                shape = ProjectionShape(
                    base.in_channels, base.out_channels, "conv", tuple(base.kernel_size)
                )
            delta = LokrDelta(shape, cfg)
            mine = {n: tuple(p.shape) for n, p in delta.named_parameters()}
            assert mine == theirs, (r, both, tucker, factor)
            assert kron_layout(cfg, shape).num_parameters() == sum(
                p.numel() for p in delta.parameters()
            )


# ----------------------------------------------------------------------------- the method


@pytest.mark.parametrize(
    "cfg",
    [
        dict(r=1, decompose_both=True, use_effective_conv2d=True, init="lycoris"),
        pytest.param(dict(r=2), marks=pytest.mark.slow),
        pytest.param(dict(r=16, decompose_factor=4, init="random"), marks=pytest.mark.slow),
    ],
)
def test_counts_identity_and_merge_on_every_layout(cfg: dict[str, Any]) -> None:
    """Exact parameter counts, the identity at init (default and lycoris inits) and merge ==
    unmerged on Linear, fused slices, a Conv2d, a Conv3d, GPT-2's Conv1D and
    nn.MultiheadAttention's in_proj slices."""
    sites = {
        "timm_vit": ["attn.q", "attn.v", "embed", "mlp.up"],
        "gpt2": ["attn.q", "attn.k", "mlp.up"],
        "open_clip": ["attn.q", "attn.v"],
        "videomae": ["attn.q", "embed"],
    }
    counts_identity_and_merge("lokr", sites, cfg, cfg.get("init", "default") != "random")


def test_bad_config_names_the_field() -> None:
    for bad in (
        dict(decompose_factor=0),
        dict(rank_dropout=1.0),
        dict(init="zeros"),
        dict(decompose_both=1),
    ):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            unipeft.apply(BACKBONES["bert"].make(), "lokr", **bad)


def test_alpha_pattern_and_non_lycoris_modules_are_refused(tmp_path: Path) -> None:
    base = _base("bert")
    pc = peft.LoKrConfig(r=2, target_modules=["query"], alpha_pattern={"query": 4})
    peft.get_peft_model(copy.deepcopy(base), pc).save_pretrained(tmp_path / "a")
    with pytest.raises(LoadError, match="alpha_pattern"):
        interop.load(copy.deepcopy(base), tmp_path / "a")
    videomae = unipeft.apply(BACKBONES["videomae"].make(), "lokr", targets=["embed"], r=2)
    with pytest.raises(unipeft.AdapterError, match="Conv3d"):
        interop.save(videomae, tmp_path / "b")
