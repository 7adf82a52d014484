"""SHiRA: a fixed sparse set of ``r · (d_in + d_out)`` weight entries trains; PEFT ``SHIRA``
folders (values and int32 indices) both ways on BERT and a timm ViT, merged weights
included, and the seeded mask equal to PEFT's.

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
from unipeft import AdapterError, ConfigError, TargetError  # noqa: E402
from unipeft.features.interop import peft as interop  # noqa: E402
from unipeft.testing.backbones import BACKBONES  # noqa: E402

# unipeft's export writes the module-selection fields every PEFT type has; PEFT drops the
# ones ShiraConfig lacks, with a warning
pytestmark = [
    pytest.mark.filterwarnings("ignore:Unexpected keyword arguments"),
    pytest.mark.filterwarnings("ignore:Sparse invariant checks"),  # PEFT's sparse ΔW
]

CASES = {
    # kind: (PEFT target_modules, unipeft targets)
    "bert": (["query", "value"], [r"encoder\.layer\.\d+\.attention\.self\.(query|value)"]),
    "vit": (["qkv", "fc1"], [r"blocks\.\d+\.attn\.qkv", r"blocks\.\d+\.mlp\.fc1"]),
}


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


# ----------------------------------------------------------------------------- PEFT parity


@pytest.mark.parametrize("kind", sorted(CASES))
def test_peft_to_unipeft(kind: str, tmp_path: Path) -> None:
    base = _base(kind)
    config = peft.ShiraConfig(
        r=2,
        target_modules=CASES[kind][0],
        random_seed=5,
        init_weights=False,  # random values
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    theirs.save_pretrained(tmp_path)
    expected = _run(theirs, kind)
    assert _diff(expected, _run(base, kind)) > 1e-3, "the PEFT adapter is the identity"
    ours = interop.load(copy.deepcopy(base), tmp_path).eval()
    cfg = ours.adapters["default"].config
    assert (cfg.r, cfg.random_seed) == (2, 5)  # type: ignore[attr-defined]
    d = _close(_run(ours, kind), expected, "PEFT -> unipeft output")
    m = _merged_weights(theirs, ours)
    print(f"\nshira {kind} PEFT->unipeft: output {d:.2e}, merged weights {m:.2e}")


@pytest.mark.parametrize("kind", sorted(CASES))
def test_unipeft_to_peft(kind: str, tmp_path: Path) -> None:
    base = _base(kind)
    ours = unipeft.apply(copy.deepcopy(base), "shira", r=3, targets=CASES[kind][1]).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in ours.deltas.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    expected = _run(ours, kind)
    assert _diff(expected, _run(base, kind)) > 1e-3, "the unipeft adapter is the identity"
    interop.save(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SHIRA" and saved["r"] == 3
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    indices = next(v for k, v in tensors.items() if k.endswith(".shira_indices"))
    assert indices.dtype == torch.int32 and indices.shape[0] == 2
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    d = _close(_run(theirs, kind), expected, "unipeft -> PEFT output")
    m = _merged_weights(theirs, ours)
    print(f"\nshira {kind} unipeft->PEFT: output {d:.2e}, merged weights {m:.2e}")


def test_seeded_mask_is_peft_mask() -> None:
    """With random_seed, unipeft draws the entries PEFT draws for the same seed."""
    base = _base("bert")
    config = peft.ShiraConfig(r=2, target_modules=["query"], random_seed=11)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    layer = theirs.base_model.model.encoder.layer[0].attention.self.query
    rows, cols = layer.shira_indices["default"].long()
    ours = unipeft.apply(copy.deepcopy(base), "shira", r=2, random_seed=11, targets=["attn.q"])
    delta = ours.adapters["default"].delta_at("encoder.layer.0:attn.q")
    assert torch.equal(delta.indices, rows * 32 + cols)


# ----------------------------------------------------------------------------- the method


def test_counts_identity_and_merge_on_every_layout() -> None:
    """Linear, fused slices (timm qkv, GPT-2 c_attn, MHA in_proj), GPT-2 Conv1D and a Conv2d."""
    for name, targets in (
        ("timm_vit", ["attn.q", "attn.v", "embed"]),
        ("gpt2", ["attn.k", "mlp.up"]),
        ("open_clip", ["attn.q", "attn.out"]),
    ):
        bb = BACKBONES[name]
        model = unipeft.apply(bb.make(), "shira", r=1, targets=targets)
        adapter = model.adapters["default"]
        want = sum(adapter.method.num_parameters(adapter.config, s) for s in adapter.sites)
        assert model.num_trainable_parameters() == want
        ref = bb.run(bb.make(), bb.sample(0)).detach()
        torch.testing.assert_close(bb.run(model, bb.sample(0)).detach(), ref, atol=1e-6, rtol=0)
        with torch.no_grad():
            for p in model.deltas.parameters():
                p.normal_()
        out = bb.run(model, bb.sample(0)).detach()
        assert _diff(out, ref) > 1e-3
        for site in adapter.sites:  # only the chosen entries of the weight change
            dense = adapter.delta_at(site).dense()
            assert int((dense != 0).sum()) == adapter.method.num_parameters(adapter.config, site)
        model.merge()
        torch.testing.assert_close(bb.run(model, bb.sample(0)).detach(), out, atol=1e-4, rtol=1e-4)
        model.unmerge()


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="r <= 16"):
        unipeft.apply(BACKBONES["bert"].make(), "shira", r=17)
    with pytest.raises(TargetError, match="attaches to projection sites"):
        unipeft.apply(BACKBONES["bert"].make(), "shira", targets=["norm"])
    gpt2 = unipeft.apply(BACKBONES["gpt2"].make(), "shira", r=1, targets=[r"h\.0\.mlp\.c_fc"])
    with pytest.raises(AdapterError, match=r"not an nn\.Linear"):  # GPT-2's Conv1D
        interop.save(gpt2, tmp_path / "out")
    assert not (tmp_path / "out").exists()
