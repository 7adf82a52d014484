"""Unit tests for the (IA)^3 plugin, on tiny randomly initialised models (no downloads)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from unipeft_ia3 import METHOD, Ia3Config, Ia3Delta

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


def _scales(model: unipeft.DeltaModel) -> list[Ia3Delta]:
    return [m for m in model.modules() if isinstance(m, Ia3Delta)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- discovery


def test_discovered_through_entry_point() -> None:
    methods = {m.id: m for m in unipeft.list_methods()}
    assert "ia3" in methods
    assert methods["ia3"].distribution == "unipeft-ia3"
    assert methods["ia3"].family == "additive"
    assert methods["ia3"].mergeable
    assert not [f for f in unipeft.plugin_failures() if f.distribution == "unipeft-ia3"]


def test_config_is_validated() -> None:
    with pytest.raises(unipeft.ConfigError, match="init"):
        Ia3Config.parse("ia3", {"init": 0.0})
    with pytest.raises(unipeft.ConfigError, match="unknown field"):
        Ia3Config.parse("ia3", {"rank": 4})
    assert METHOD.is_identity_at_init(Ia3Config())
    assert not METHOD.is_identity_at_init(Ia3Config(init=0.5))


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("name", list(BACKBONES))
def test_identity_at_init_and_parameter_count(name: str) -> None:
    backbone, inputs = BACKBONES[name]()
    backbone.eval()
    before = _run(backbone, inputs)
    model = unipeft.apply(backbone, "ia3")
    adapter = model.adapters["default"]
    roles = {site.role for site in adapter.sites}
    assert roles == {"attn.k", "attn.v", "mlp.up"}
    expected = sum(METHOD.num_parameters(adapter.config, s) for s in adapter.sites)
    assert model.num_trainable_parameters() == expected == adapter.num_parameters()
    for a, b in zip(before, _run(model, inputs), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_scales_only_the_targeted_slice_of_fused_qkv() -> None:
    backbone, inputs = _timm_vit()
    backbone.eval()
    model = unipeft.apply(backbone, "ia3", targets=["attn.v"])
    assert len(model.deltas["default"]) == 2  # attn.v of each of the two blocks
    with torch.no_grad():
        for delta in _scales(model):
            delta.l.fill_(2.0)

    # registered after unipeft's hook, so this one sees the adapted output of the qkv Linear
    seen: list[Tensor] = []
    qkv = backbone.blocks[0].attn.qkv
    handle = qkv.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    with model.disable():
        _run(model, inputs)
    _run(model, inputs)
    handle.remove()

    base, adapted = seen
    q, k, v = base.chunk(3, dim=-1)
    aq, ak, av = adapted.chunk(3, dim=-1)
    assert torch.equal(aq, q) and torch.equal(ak, k)
    torch.testing.assert_close(av, 2 * v, atol=1e-6, rtol=0)
    assert not torch.allclose(v, av)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_merge_matches_unmerged_and_unmerge_is_exact(name: str) -> None:
    backbone, inputs = BACKBONES[name]()
    backbone.eval()
    original = {n: p.detach().clone() for n, p in backbone.state_dict().items()}
    model = unipeft.apply(backbone, "ia3")
    with torch.no_grad():
        for delta in _scales(model):
            delta.l.uniform_(0.5, 1.5)
    unmerged = _run(model, inputs)
    with model.disable():
        plain = _run(model, inputs)
    assert not all(torch.allclose(a, b) for a, b in zip(plain, unmerged, strict=True))

    model.merge()
    assert model.merged
    changed = [n for n, p in backbone.state_dict().items() if not torch.equal(p, original[n])]
    assert changed, "merging should have rescaled some weights"
    for a, b in zip(unmerged, _run(model, inputs), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)

    model.unmerge()
    state = backbone.state_dict()
    assert state.keys() == original.keys()
    for n, p in state.items():
        assert torch.equal(p, original[n]), f"{n} not restored bit-exactly"
    for a, b in zip(unmerged, _run(model, inputs), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_non_unit_init_and_save_load_round_trip(tmp_path) -> None:
    backbone, inputs = _bert()
    backbone.eval()
    model = unipeft.apply(backbone, "ia3", init=0.5, targets=["attn.v"])
    assert all(torch.equal(d.l, torch.full_like(d.l, 0.5)) for d in _scales(model))
    with torch.no_grad():
        for delta in _scales(model):
            delta.l.uniform_(0.5, 1.5)
    expected = _run(model, inputs)
    model.save(str(tmp_path))

    torch.manual_seed(0)
    fresh, _ = _bert()
    fresh.load_state_dict(model.base_model.state_dict())
    fresh.eval()
    loaded = unipeft.load(fresh, str(tmp_path))
    assert loaded.adapters["default"].config == Ia3Config(init=0.5)
    for a, b in zip(expected, _run(loaded, inputs), strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_conv_channel_dim_and_merge_without_bias() -> None:
    """The scale broadcasts along dim 1 of a conv output and merges into (out, in, k, k)."""
    conv = nn.Conv2d(3, 4, 3, bias=False)
    delta = Ia3Delta(4, init=1.0, channel_dim=1)
    with torch.no_grad():
        delta.l.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0]))
    x = torch.randn(2, 3, 8, 8)
    y = conv(x)
    new_w, new_b = delta.merged(conv.weight.detach(), None)
    assert new_b is None
    expected = torch.nn.functional.conv2d(x, new_w)
    torch.testing.assert_close(delta(x, y), expected, atol=1e-5, rtol=1e-5)
