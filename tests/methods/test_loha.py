"""LoHa: ``ΔW = s (W1_a W1_b) ⊙ (W2_a W2_b)`` on every projection layout, Tucker factors on
convolutions; PEFT folders both ways on BERT, a timm ViT (its patch-embedding Conv2d
included) and an ``nn.Conv1d`` stack, merged weights included, and the train-time dropouts
against PEFT's under one seed.

Every comparison starts both libraries from ``copy.deepcopy`` of one random backbone."""

from __future__ import annotations

import copy
import json
import math
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

import unipeft  # noqa: E402
from unipeft import ConfigError, LoadError  # noqa: E402
from unipeft.contract.deltas import ProjectionShape  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402
from unipeft.methods.reparameterized.loha import LohaDelta, row_dropout  # noqa: E402
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
    "flat": dict(r=2, alpha=3.0),
    "tucker": dict(r=3, alpha=5.0, use_effective_conv2d=True),
}


class _Conv1dNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv1d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 4, 3, dilation=2))


def _base(kind: str) -> nn.Module:
    return base(kind, _Conv1dNet)


def _run(model: nn.Module, kind: str) -> Tensor:
    return run(model, kind, 6)


def _peft_config(targets: list[str], cfg: dict[str, Any], **kw: Any) -> Any:
    return peft.LoHaConfig(
        r=cfg["r"],
        alpha=cfg["alpha"],
        use_effective_conv2d=cfg.get("use_effective_conv2d", False),
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
    assert loaded.use_effective_conv2d == cfg.get("use_effective_conv2d", False)  # type: ignore[attr-defined]
    d = _close(_run(ours, kind), expected, "PEFT -> unipeft output")
    m = _merged_weights(theirs, ours)
    print(f"\nloha {kind}/{config} PEFT->unipeft: output {d:.2e}, merged weights {m:.2e}")


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(CASES))
def test_unipeft_to_peft(kind: str, config: str, tmp_path: Path) -> None:
    cfg = CONFIGS[config]
    base = _base(kind)
    ours = unipeft.apply(copy.deepcopy(base), "loha", targets=CASES[kind][1], init="random", **cfg)
    ours.eval()
    expected = _run(ours, kind)
    assert _diff(expected, _run(base, kind)) > 1e-3, "the unipeft adapter is the identity"
    interop.save(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LOHA" and saved["r"] == cfg["r"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    d = _close(_run(theirs, kind), expected, "unipeft -> PEFT output")
    m = _merged_weights(theirs, ours)
    print(f"\nloha {kind}/{config} unipeft->PEFT: output {d:.2e}, merged weights {m:.2e}")


def test_train_time_dropouts_match_peft_under_one_seed(tmp_path: Path) -> None:
    """rank_dropout and module_dropout draw the same random numbers in the same order as
    PEFT's, so a training forward under one seed gives PEFT's output."""
    base = _base("bert")
    targets = CASES["bert"][0]
    pc = _peft_config(targets, CONFIGS["flat"], rank_dropout=0.4, module_dropout=0.3)
    theirs = peft.get_peft_model(copy.deepcopy(base), pc)
    theirs.save_pretrained(tmp_path)
    ours = interop.load(copy.deepcopy(base), tmp_path)
    assert ours.adapters["default"].config.rank_dropout == 0.4
    d = train_mode_diff(theirs, ours, "bert")
    print(f"\nloha train-mode dropouts vs PEFT: {d:.2e}")


# ----------------------------------------------------------------------------- the method


@pytest.mark.parametrize(
    "cfg",
    [
        dict(r=3, use_effective_conv2d=True),
        pytest.param(dict(r=2), marks=pytest.mark.slow),
        pytest.param(dict(r=1, init="random"), marks=pytest.mark.slow),
    ],
)
def test_counts_identity_and_merge_on_every_layout(cfg: dict[str, Any]) -> None:
    """Exact parameter counts, the identity at init (default init) and merge == unmerged on
    Linear, fused slices, a Conv2d (timm's patch embedding) and GPT-2's Conv1D."""
    sites = {
        "timm_vit": ["attn.q", "attn.v", "embed"],
        "gpt2": ["attn.q", "attn.k", "mlp.up"],
        "open_clip": ["attn.q", "attn.v"],  # nn.MultiheadAttention in_proj slices
        "videomae": ["attn.q", "embed"],  # a Conv3d patch embedding
    }
    counts_identity_and_merge("loha", sites, cfg, cfg.get("init", "default") == "default")


def test_tucker_factors_only_on_kernels_larger_than_one() -> None:
    model = unipeft.apply(
        BACKBONES["timm_vit"].make(), "loha", targets=["attn.q", "embed"], r=2,
        use_effective_conv2d=True,
    )  # fmt: skip
    kinds = {}
    for site in model.adapters["default"].sites:
        delta = model.adapters["default"].delta_at(site)
        assert isinstance(delta, LohaDelta)
        kinds[site.weight.layout] = delta.tucker  # type: ignore[union-attr]
    assert kinds == {"linear": False, "conv": True}
    conv = nn.Sequential(nn.Conv2d(4, 6, 1))
    one = unipeft.apply(conv, "loha", targets=["0"], r=2, use_effective_conv2d=True)
    assert not one.adapters["default"].delta_at("0").tucker  # type: ignore[union-attr]
    assert one.num_trainable_parameters() == 2 * 2 * (6 + 4)


def test_rank_above_a_factors_reach_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"r=40 .*Choose r <= 32"):
        unipeft.apply(BACKBONES["bert"].make(), "loha", r=40)
    # a Tucker factor of the patch conv (3 -> 32 channels) reaches every tensor at r = 32
    vit = BACKBONES["timm_vit"].make()
    unipeft.apply(vit, "loha", targets=["embed"], r=32, use_effective_conv2d=True)
    with pytest.raises(ConfigError, match=r"Choose r <= 32"):
        unipeft.apply(
            BACKBONES["timm_vit"].make(), "loha", targets=["embed"], r=33,
            use_effective_conv2d=True,
        )  # fmt: skip


def test_bad_config_names_the_field() -> None:
    for bad in (dict(rank_dropout=1.0), dict(module_dropout=-0.1), dict(init="zeros"), dict(r=0)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            unipeft.apply(BACKBONES["bert"].make(), "loha", **bad)


def test_row_dropout_keeps_rows_whole_and_rescales() -> None:
    torch.manual_seed(0)
    w = torch.ones(1000, 3)
    out = row_dropout(w, 0.25, rescale=True)
    kept = out[:, 0] != 0
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1000 / int(kept.sum())))
    assert 650 < int(kept.sum()) < 850
    assert torch.equal(row_dropout(w, 0.9999999, rescale=True), torch.zeros_like(w))  # no NaN


def test_gpt2_conv1d_and_slices_are_refused_by_the_peft_codec(tmp_path: Path) -> None:
    gpt2 = unipeft.apply(BACKBONES["gpt2"].make(), "loha", targets=[r"h\.0\.attn\.c_attn"], r=2)
    with pytest.raises(unipeft.AdapterError, match="Conv1D"):
        interop.save(gpt2, tmp_path / "a")
    vit = unipeft.apply(BACKBONES["timm_vit"].make(), "loha", targets=["attn.q"], r=2)
    with pytest.raises(unipeft.AdapterError, match="slice"):
        interop.save(vit, tmp_path / "b")


def test_rank_pattern_is_refused(tmp_path: Path) -> None:
    base = _base("bert")
    pc = peft.LoHaConfig(r=2, target_modules=["query"], rank_pattern={"query": 4})
    peft.get_peft_model(copy.deepcopy(base), pc).save_pretrained(tmp_path)
    with pytest.raises(LoadError, match="rank_pattern"):
        interop.load(copy.deepcopy(base), tmp_path)


def test_formula_matches_parameter_shapes() -> None:
    d = LohaDelta(ProjectionShape(6, 8, "conv", (3, 3)), 2, 1.0)
    assert sum(p.numel() for p in d.parameters()) == 2 * 2 * (8 + 6 * 9)
    t = LohaDelta(ProjectionShape(6, 8, "conv", (3, 3)), 2, 1.0, 0, 0, True)
    assert sum(p.numel() for p in t.parameters()) == 2 * (2 * 8 + 2 * 6 + 4 * math.prod((3, 3)))
