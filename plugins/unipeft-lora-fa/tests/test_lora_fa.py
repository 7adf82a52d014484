"""Unit tests for the LoRA-FA plugin, on tiny randomly initialised models (no downloads)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from unipeft_lora_fa import METHOD, LoraFaConfig, LoraFaDelta

import unipeft

# --------------------------------------------------------------------------- tiny backbones


def _bert() -> tuple[nn.Module, tuple[Tensor, ...]]:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
    )
    return BertModel(cfg), (torch.randint(0, 100, (2, 7)),)


def _timm_vit() -> tuple[nn.Module, tuple[Tensor, ...]]:
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=5,
    )
    return model, (torch.randn(2, 3, 32, 32),)


def _open_clip() -> tuple[nn.Module, tuple[Tensor, ...]]:
    open_clip = pytest.importorskip("open_clip")
    model = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=2, width=32, head_width=16, patch_size=8, image_size=32
        ),
        text_cfg=open_clip.model.CLIPTextCfg(
            context_length=12, vocab_size=100, width=32, heads=2, layers=2
        ),
    )
    return model, (torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2, 12)))


BACKBONES: dict[str, Callable[[], tuple[nn.Module, tuple[Tensor, ...]]]] = {
    "bert": _bert,
    "timm": _timm_vit,
    "open_clip": _open_clip,
}


def _tensors(out: object) -> list[Tensor]:
    """The tensors of a model output (a tensor, a tuple of them or a ModelOutput)."""
    if isinstance(out, Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    assert isinstance(out, tuple | list)
    return [t for t in out if isinstance(t, Tensor)]


def _run(model: nn.Module, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    with torch.no_grad():
        return [t.clone() for t in _tensors(model(*inputs))]


def _deltas(model: unipeft.DeltaModel) -> list[LoraFaDelta]:
    return [m for m in model.modules() if isinstance(m, LoraFaDelta)]


def _perturb(model: unipeft.DeltaModel) -> None:
    with torch.no_grad():
        for delta in _deltas(model):
            delta.B.normal_()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- discovery


def test_discovered_through_entry_point() -> None:
    methods = {m.id: m for m in unipeft.list_methods()}
    assert "lora_fa" in methods
    assert methods["lora_fa"].distribution == "unipeft-lora-fa"
    assert methods["lora_fa"].family == "reparameterized"
    assert methods["lora_fa"].mergeable
    assert methods["lora_fa"].budget_field == "r"
    assert not [f for f in unipeft.plugin_failures() if f.distribution == "unipeft-lora-fa"]


def test_config_is_validated() -> None:
    with pytest.raises(unipeft.ConfigError, match="'r'"):
        LoraFaConfig.parse("lora_fa", {"r": 0})
    with pytest.raises(unipeft.ConfigError, match="'init'"):
        LoraFaConfig.parse("lora_fa", {"init": "zeros"})
    with pytest.raises(unipeft.ConfigError, match="unknown field"):
        LoraFaConfig.parse("lora_fa", {"rank": 4})


def test_rank_above_the_projection_is_refused() -> None:
    backbone, _ = _bert()
    with pytest.raises(unipeft.ConfigError, match="r=33"):
        unipeft.apply(backbone, "lora_fa", r=33)


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("name", list(BACKBONES))
def test_identity_at_init_and_only_b_trains(name: str) -> None:
    backbone, inputs = BACKBONES[name]()
    backbone.eval()
    before = _run(backbone, inputs)
    model = unipeft.apply(backbone, "lora_fa", r=2)
    adapter = model.adapters["default"]
    assert {site.role for site in adapter.sites} == {"attn.q", "attn.v"}
    expected = sum(METHOD.num_parameters(adapter.config, s) for s in adapter.sites)
    assert model.num_trainable_parameters() == expected == adapter.num_parameters()
    for delta in _deltas(model):
        assert [n for n, _ in delta.named_parameters()] == ["B"]
        assert "A" in dict(delta.named_buffers()) and not delta.A.requires_grad
    for a, b in zip(before, _run(model, inputs), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_gradient_reaches_b_and_a_stays_put() -> None:
    backbone, inputs = _timm_vit()
    model = unipeft.apply(backbone, "lora_fa", r=2)
    _perturb(model)
    frozen = [d.A.clone() for d in _deltas(model)]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(*inputs).pow(2).mean().backward()
    assert all(d.B.grad is not None and d.B.grad.abs().sum() > 0 for d in _deltas(model))
    opt.step()
    assert all(torch.equal(d.A, a) for d, a in zip(_deltas(model), frozen, strict=True))


def test_same_function_as_lora_with_the_same_factors() -> None:
    backbone, inputs = _bert()
    backbone.eval()
    lora = unipeft.apply(backbone, "lora", r=2, alpha=3.0, adapter_name="lora")
    lora.add_adapter("fa", "lora_fa", r=2, alpha=3.0)
    with torch.no_grad():
        for site in lora.adapters["fa"].sites:
            fa, ref = lora.adapters["fa"].delta_at(site), lora.adapters["lora"].delta_at(site)
            fa.B.normal_()
            ref.A.copy_(fa.A)
            ref.B.copy_(fa.B)
    lora.set_active("lora")
    expected = _run(lora, inputs)
    lora.set_active("fa")
    for a, b in zip(expected, _run(lora, inputs), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_merge_matches_unmerged_and_unmerge_is_exact(name: str) -> None:
    backbone, inputs = BACKBONES[name]()
    backbone.eval()
    original = {n: p.detach().clone() for n, p in backbone.state_dict().items()}
    model = unipeft.apply(backbone, "lora_fa", r=2)
    _perturb(model)
    unmerged = _run(model, inputs)
    model.merge()
    for a, b in zip(unmerged, _run(model, inputs), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    model.unmerge()
    for n, p in backbone.state_dict().items():
        assert torch.equal(p, original[n]), f"{n} not restored bit-exactly"


def test_save_load_restores_the_frozen_a(tmp_path) -> None:
    backbone, inputs = _bert()
    backbone.eval()
    model = unipeft.apply(backbone, "lora_fa", r=2, targets=["attn.v"])
    _perturb(model)
    expected = _run(model, inputs)
    model.save(str(tmp_path))

    torch.manual_seed(123)  # another A would be drawn: the file's must win
    fresh, _ = _bert()
    fresh.load_state_dict(model.base_model.state_dict())
    fresh.eval()
    loaded = unipeft.load(fresh, str(tmp_path))
    for a, b in zip(expected, _run(loaded, inputs), strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=0)
