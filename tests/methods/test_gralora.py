"""GraLoRA: a low-rank pair per block of a k × k grid of the weight, plus the hybrid LoRA;
PEFT folders both ways on BERT and a timm ViT (and GPT-2's Conv1D), merged weights
included; convolutions refused, sizes that do not fit a site refused naming the field.

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
from unipeft.methods.reparameterized.gralora import GraloraDelta  # noqa: E402
from unipeft.testing.backbones import BACKBONES  # noqa: E402

CASES = {
    # kind: (PEFT target_modules, unipeft targets)
    "bert": (
        ["query", "value", "intermediate.dense"],
        [r"encoder\.layer\.\d+\.attention\.self\.(query|value)", r".*intermediate\.dense"],
    ),
    "vit": (["qkv", "fc1"], [r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.mlp\.fc1"]),
    "gpt2": (["c_attn", "c_fc"], [r"h\.\d+\.attn\.c_attn", r"h\.\d+\.mlp\.c_fc"]),
}


def _randomise(params: list[tuple[str, nn.Parameter]], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in params:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _max_weight_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(_diff(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the maths


def _blockwise(delta: GraloraDelta) -> Tensor:
    """``ΔW`` block by block, from the definition (block (m, n) = B_m[n]ᵀ A_n[m]ᵀ)."""
    k, s = delta.k, delta.r // delta.k
    rows = []
    for m in range(k):
        row = []
        for n in range(k):
            a = delta.A[n][:, m * s : (m + 1) * s]  # (in/k, s): block n's down for output m
            b = delta.B[m][n * s : (n + 1) * s, :]  # (s, out/k): block m's up from input n
            row.append((a @ b).t())
        rows.append(torch.cat(row, dim=1))
    dw = torch.cat(rows, dim=0)
    if delta.hybrid_r:
        dw = dw + delta.B_hybrid @ delta.A_hybrid
    return dw * delta.scaling


@pytest.mark.parametrize("hybrid_r", [0, 2])
def test_identity_at_init_and_the_block_update(hybrid_r: int) -> None:
    base = _base("bert")
    model = unipeft.apply(
        copy.deepcopy(base), "gralora", r=4, gralora_k=4, hybrid_r=hybrid_r, alpha=3.0
    )
    assert torch.equal(_run(model, "bert"), _run(base, "bert"))
    delta = model.adapters["default"].attachments[0].delta
    assert isinstance(delta, GraloraDelta)
    assert delta.scaling == pytest.approx(3.0 / (4 + hybrid_r))
    _randomise(list(delta.named_parameters()), 1)
    dw = _blockwise(delta)
    assert torch.linalg.matrix_rank(dw) > 4 + hybrid_r  # more than LoRA's rank
    x, y = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    w = torch.randn(32, 32)
    torch.testing.assert_close(delta.delta_weight(), dw, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(delta(x, y), y + x @ dw.t(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(delta.merged(w, None)[0], w + dw, atol=1e-6, rtol=1e-6)


def test_slices_and_mha_merge() -> None:
    for name in ("timm_vit", "open_clip"):
        bb = BACKBONES[name]
        model = unipeft.apply(bb.make(), "gralora", r=4, hybrid_r=1, targets=["attn.q", "attn.v"])
        _randomise(list(model.deltas.named_parameters()), 2)
        with torch.no_grad():
            x = bb.sample(0)
            before = bb.run(model, x)
            model.merge()
            torch.testing.assert_close(bb.run(model, x), before, atol=1e-5, rtol=1e-4)


def test_refusals_name_the_field_and_the_limit() -> None:
    bert = BACKBONES["bert"]
    with pytest.raises(unipeft.TargetError, match=r"convolution.*Conv1D only"):
        unipeft.apply(BACKBONES["timm_vit"].make(), "gralora", targets=["embed"])
    with pytest.raises(unipeft.ConfigError, match=r"gralora_k=3 does not divide .*32->32"):
        unipeft.apply(bert.make(), "gralora", r=3, gralora_k=3)
    with pytest.raises(unipeft.ConfigError, match=r"r \(6\) must be a multiple of gralora_k"):
        unipeft.apply(bert.make(), "gralora", r=6, gralora_k=4)
    with pytest.raises(unipeft.ConfigError, match=r"r=64 .*Choose r <= 32"):
        unipeft.apply(bert.make(), "gralora", r=64, gralora_k=2)
    with pytest.raises(unipeft.ConfigError, match=r"hybrid_r=33 .*Choose hybrid_r <= 32"):
        unipeft.apply(bert.make(), "gralora", hybrid_r=33)


# ----------------------------------------------------------------------------- PEFT parity


@pytest.mark.parametrize(("kind", "hybrid_r"), [("bert", 0), ("bert", 2), ("vit", 2)])
def test_peft_to_unipeft(kind: str, hybrid_r: int, tmp_path: Path) -> None:
    base = _base(kind)
    config = peft.GraloraConfig(
        r=4, alpha=6, gralora_k=2, hybrid_r=hybrid_r, target_modules=CASES[kind][0]
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    _randomise([(n, p) for n, p in theirs.named_parameters() if "gralora_" in n], 3)
    theirs.save_pretrained(str(tmp_path))
    ours = interop.load(copy.deepcopy(base), tmp_path).eval()
    assert ours.adapters["default"].method.id == "gralora"
    what = f"gralora PEFT->unipeft {kind} hybrid_r={hybrid_r}"
    _close(_run(ours, kind), _run(theirs, kind), _run(base, kind), what)
    ours.merge()
    merged = theirs.merge_and_unload()
    d = _max_weight_diff(_weights(ours.base_model), _weights(merged))
    print(f"gralora merged weights {kind} hybrid_r={hybrid_r}: max abs diff {d:.3e}")
    assert d <= 1e-6


@pytest.mark.parametrize(("kind", "hybrid_r"), [("bert", 1), ("vit", 0), ("gpt2", 2)])
def test_unipeft_to_peft(kind: str, hybrid_r: int, tmp_path: Path) -> None:
    base = _base(kind)
    ours = unipeft.apply(
        copy.deepcopy(base), "gralora", r=4, gralora_k=4, hybrid_r=hybrid_r, alpha=5.0,
        targets=CASES[kind][1],
    ).eval()  # fmt: skip
    _randomise(list(ours.deltas.named_parameters()), 4)
    interop.save(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    what = f"gralora unipeft->PEFT {kind} hybrid_r={hybrid_r}"
    _close(_run(theirs, kind), _run(ours, kind), _run(base, kind), what)
