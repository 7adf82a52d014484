"""LN-tuning: the norms' weight and bias train as a change ``Δ``; PEFT ``LN_TUNING`` folders
(full trained norms) both ways on BERT and a timm ViT, merged weights included, and a Llama
(RMSNorm) round trip.

Every comparison starts both libraries from ``copy.deepcopy`` of one random backbone."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

import unipeft  # noqa: E402
from unipeft import AdapterError, LoadError, TargetError  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402
from unipeft.testing.backbones import BACKBONES  # noqa: E402

# unipeft's export writes the module-selection fields every PEFT type has, and PEFT drops
# the ones LNTuningConfig lacks with a warning; PEFT also warns that it copies a norm
pytestmark = [
    pytest.mark.filterwarnings("ignore:Unexpected keyword arguments"),
    pytest.mark.filterwarnings("ignore:Unsupported layer type"),
]

CASES = {
    # kind: (PEFT target_modules, unipeft targets)
    "bert": (["LayerNorm"], ["norm", r"embeddings\.LayerNorm"]),
    "vit": (r"blocks\.\d+\.norm[12]|norm", ["norm", "re:norm"]),  # blocks' norms, the last
}


def _base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=100, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        return transformers.BertModel(cfg).eval()
    if kind == "llama":
        return BACKBONES["llama"].make().eval()
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


def _diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def _close(a: Tensor, b: Tensor, what: str) -> float:
    d = _diff(a, b)
    scale = max(1.0, b.abs().max().item())
    assert d <= 1e-5 * scale, f"{what}: largest difference {d:.3e} (output scale {scale:.3g})"
    return d


def _randomise_peft(model: Any) -> None:
    """PEFT's trained norm copies, moved well away from the base norms."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_tuning_layers" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _perturb(model: unipeft.DeltaModel) -> None:
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.deltas.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _merged_weights(peft_model: Any, ours: unipeft.DeltaModel) -> float:
    """Largest difference between PEFT's merge_and_unload() and unipeft's merge()."""
    ours.merge()
    mine = ours.base_model.state_dict()
    theirs = peft_model.merge_and_unload().state_dict()
    assert set(mine) == set(theirs)
    return max(_close(mine[k], theirs[k], f"merged {k}") for k in mine)


# ----------------------------------------------------------------------------- PEFT parity


@pytest.mark.parametrize("kind", sorted(CASES))
def test_peft_to_unipeft(kind: str, tmp_path: Path) -> None:
    base = _base(kind)
    config = peft.LNTuningConfig(target_modules=CASES[kind][0])
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    _randomise_peft(theirs)
    theirs.save_pretrained(tmp_path)
    expected = _run(theirs, kind)
    assert _diff(expected, _run(base, kind)) > 1e-3, "the PEFT adapter is the identity"
    ours = interop.load(copy.deepcopy(base), tmp_path).eval()
    sites = ours.adapters["default"].sites
    assert len(sites) == 5  # the block norms, and the embeddings' (BERT) or the last (ViT)
    d = _close(_run(ours, kind), expected, "PEFT -> unipeft output")
    m = _merged_weights(theirs, ours)
    print(f"\nln_tuning {kind} PEFT->unipeft: output {d:.2e}, merged weights {m:.2e}")


@pytest.mark.parametrize("kind", sorted(CASES))
def test_unipeft_to_peft(kind: str, tmp_path: Path) -> None:
    base = _base(kind)
    ours = unipeft.apply(copy.deepcopy(base), "ln_tuning", targets=CASES[kind][1]).eval()
    _perturb(ours)
    expected = _run(ours, kind)
    assert _diff(expected, _run(base, kind)) > 1e-3, "the unipeft adapter is the identity"
    interop.save(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LN_TUNING"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    norm = next(k for k in tensors if k.endswith("ln_tuning_layers.weight"))
    assert tensors[norm].shape == (32,)  # the whole trained norm, as PEFT saves it
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    d = _close(_run(theirs, kind), expected, "unipeft -> PEFT output")
    m = _merged_weights(theirs, ours)
    print(f"\nln_tuning {kind} unipeft->PEFT: output {d:.2e}, merged weights {m:.2e}")


def test_llama_rms_norms_both_ways(tmp_path: Path) -> None:
    """RMSNorm (no bias, float32 normalisation) matches PEFT's trained copies."""
    base = _base("llama")
    config = peft.LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm"])
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    _randomise_peft(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    expected = _run(theirs, "llama")
    assert _diff(expected, _run(base, "llama")) > 1e-3, "the PEFT adapter is the identity"
    ours = interop.load(copy.deepcopy(base), tmp_path / "peft").eval()
    assert ours.num_trainable_parameters() == 4 * 32  # weight only: RMSNorm has no bias
    d1 = _close(_run(ours, "llama"), expected, "PEFT -> unipeft output")
    interop.save(ours, tmp_path / "back")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
    d2 = _close(_run(back, "llama"), expected, "unipeft -> PEFT output")
    print(f"\nln_tuning llama RMSNorm: PEFT->unipeft {d1:.2e}, unipeft->PEFT {d2:.2e}")


# ----------------------------------------------------------------------------- the method


def test_counts_and_sites_on_the_tiny_backbones() -> None:
    for name, per_norm in (("bert", 64), ("llama", 32), ("open_clip", 64)):
        model = unipeft.apply(BACKBONES[name].make(), "ln_tuning")
        sites = model.adapters["default"].sites
        assert {s.role for s in sites} == {"norm"}
        assert model.num_trainable_parameters() == per_norm * len(sites)


def test_non_norm_sites_are_refused() -> None:
    with pytest.raises(TargetError, match="not a norm"):
        unipeft.apply(BACKBONES["bert"].make(), "ln_tuning", targets=["attn.q"])
    with pytest.raises(TargetError, match="not a LayerNorm or RMSNorm"):
        unipeft.apply(BACKBONES["bert"].make(), "ln_tuning", targets=[r"encoder\.layer\.0"])
    norms = nn.Sequential(nn.GroupNorm(2, 4), nn.LayerNorm(4, elementwise_affine=False))
    with pytest.raises(TargetError, match="GroupNorm"):
        unipeft.apply(norms, "ln_tuning", targets=["0"])
    with pytest.raises(TargetError, match="elementwise_affine=False"):
        unipeft.apply(norms, "ln_tuning", targets=["1"])


def test_peft_folder_on_a_projection_is_refused(tmp_path: Path) -> None:
    base = _base("bert")
    config = peft.LNTuningConfig(target_modules=["query"])  # PEFT copies any module
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path)
    with pytest.raises(LoadError, match="not a norm"):
        interop.load(copy.deepcopy(base), tmp_path)


def test_merged_adapter_is_not_saved(tmp_path: Path) -> None:
    model = unipeft.apply(_base("bert"), "ln_tuning")
    _perturb(model)
    model.merge()
    with pytest.raises(AdapterError, match="unmerge"):
        interop.save(model, tmp_path / "out")
