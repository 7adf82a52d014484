"""DeLoRA: the normalised low-rank update with a learned boundary, scaled by the column
norms of the base weight (kept as a buffer, as PEFT keeps them); PEFT folders both ways on
BERT and a timm ViT, merged weights included; convolutions refused.

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
from unipeft.methods.reparameterized.delora import DeloraDelta  # noqa: E402
from unipeft.testing.backbones import BACKBONES  # noqa: E402

CASES = {
    # kind: (PEFT target_modules, unipeft targets)
    "bert": (
        ["query", "value", "intermediate.dense"],
        [r"encoder\.layer\.\d+\.attention\.self\.(query|value)", r".*intermediate\.dense"],
    ),
    "vit": (["qkv", "fc1"], [r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.mlp\.fc1"]),
}


def _randomise(params: list[tuple[str, nn.Parameter]], seed: int) -> None:
    """Random factors, and a boundary λ in [1, 3) (not the init's 15)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            if "lambda" in name or "boundary" in name:
                p.copy_(1.0 + 2.0 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _max_weight_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(_diff(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the maths


def test_identity_at_init_and_the_normalised_update() -> None:
    base = _base("bert")
    model = unipeft.apply(copy.deepcopy(base), "delora", r=3, boundary=2.5)
    assert torch.equal(_run(model, "bert"), _run(base, "bert"))
    delta = model.adapters["default"].attachments[0].delta
    assert isinstance(delta, DeloraDelta)
    assert delta.boundary.item() == 2.5
    site = model.adapters["default"].sites[0]
    w, b = site.weight_views()
    torch.testing.assert_close(delta.w_norm, w.norm(dim=0))  # column norms, a buffer
    assert "w_norm" in delta.state_dict() and "w_norm" not in dict(delta.named_parameters())
    _randomise(list(delta.named_parameters()), 1)
    terms = [
        torch.outer(delta.B[:, i], delta.A[i]) / (delta.B[:, i].norm() * delta.A[i].norm())
        for i in range(3)
    ]
    dw = delta.boundary / 3 * sum(terms) * w.norm(dim=0)
    x, y = torch.randn(5, 32), torch.randn(5, 32)
    torch.testing.assert_close(delta.delta_weight(), dw, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(delta(x, y), y + x @ dw.t(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(delta.merged(w, b)[0], w + dw, atol=1e-6, rtol=1e-6)
    # the boundary bounds the update: ‖ΔW‖_F <= λ · max_j ‖W_:,j‖
    assert dw.norm() <= delta.boundary.item() * w.norm(dim=0).max() + 1e-6


def test_fused_slices_read_their_own_rows_and_merge() -> None:
    bb = BACKBONES["timm_vit"]
    model = unipeft.apply(bb.make(), "delora", r=2, targets=["attn.q", "attn.v"])
    for att in model.adapters["default"].attachments:
        w, _ = att.site.weight_views()
        assert w.shape[0] == 32  # the slice's rows, not the fused 96
        torch.testing.assert_close(att.delta.w_norm, w.norm(dim=0))
    _randomise(list(model.deltas.named_parameters()), 2)
    with torch.no_grad():
        x = bb.sample(0)
        before = bb.run(model, x)
        model.merge()
        torch.testing.assert_close(bb.run(model, x), before, atol=1e-5, rtol=1e-4)


def test_convolutions_are_refused_and_sizes_checked() -> None:
    with pytest.raises(unipeft.TargetError, match=r"convolution.*nn\.Linear only"):
        unipeft.apply(BACKBONES["timm_vit"].make(), "delora", targets=["embed"])
    with pytest.raises(unipeft.ConfigError, match=r"r=33 .*Choose r <= 32"):
        unipeft.apply(BACKBONES["bert"].make(), "delora", r=33)
    with pytest.raises(unipeft.ConfigError, match="'boundary'"):
        unipeft.apply(BACKBONES["bert"].make(), "delora", boundary=0.0)


def test_gpt2_conv1d_works_but_cannot_be_written_as_peft(tmp_path: Path) -> None:
    """PEFT's DeLoRA takes nn.Linear only; unipeft's also adapts GPT-2's Conv1D."""
    bb = BACKBONES["gpt2"]
    model = unipeft.apply(bb.make(), "delora", r=2, targets=[r".*mlp\.c_fc"])
    _randomise(list(model.deltas.named_parameters()), 3)
    with torch.no_grad():
        x = bb.sample(0)
        before = bb.run(model, x)
        model.merge()
        torch.testing.assert_close(bb.run(model, x), before, atol=1e-5, rtol=1e-4)
        model.unmerge()
    with pytest.raises(unipeft.AdapterError, match="DeLoRA adapts"):
        interop.save(model, tmp_path)


# ----------------------------------------------------------------------------- PEFT parity


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_peft_to_unipeft(kind: str, tmp_path: Path) -> None:
    base = _base(kind)
    config = peft.DeloraConfig(r=3, delora_lambda=5, target_modules=CASES[kind][0])
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    _randomise([(n, p) for n, p in theirs.named_parameters() if "delora_" in n], 3)
    theirs.save_pretrained(str(tmp_path))
    ours = interop.load(copy.deepcopy(base), tmp_path).eval()
    assert ours.adapters["default"].method.id == "delora"
    assert ours.adapters["default"].config.boundary == 5.0
    _close(_run(ours, kind), _run(theirs, kind), _run(base, kind), f"delora PEFT->unipeft {kind}")
    ours.merge()
    merged = theirs.merge_and_unload()
    d = _max_weight_diff(_weights(ours.base_model), _weights(merged))
    print(f"delora merged weights {kind}: max abs diff {d:.3e}")
    assert d <= 1e-6


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_unipeft_to_peft(kind: str, tmp_path: Path) -> None:
    base = _base(kind)
    ours = unipeft.apply(copy.deepcopy(base), "delora", r=3, targets=CASES[kind][1]).eval()
    _randomise(list(ours.deltas.named_parameters()), 4)
    interop.save(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    _close(_run(theirs, kind), _run(ours, kind), _run(base, kind), f"delora unipeft->PEFT {kind}")


def test_peft_patterns_are_refused_naming_the_field(tmp_path: Path) -> None:
    base = _base("bert")
    config = peft.DeloraConfig(r=2, target_modules=["query"], lambda_pattern={"query": 3})
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(str(tmp_path))
    with pytest.raises(unipeft.LoadError, match=r"lambda_pattern=.*one delora_lambda"):
        interop.load(copy.deepcopy(base), tmp_path)
