"""Convpass: the adapted timm ViT against the block maths written out (the bypass beside
attention and MLP, the patch grid as an image, the class token as a one-pixel image, as
the paper's code does), the grid inferred from the token count, refusals (text models and
towers, video, projections)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from _vision_ref import IMAGES, close, randomise, tiny_vit, vit_tokens  # noqa: E402

import unipeft  # noqa: E402
from unipeft.contract.errors import TargetError  # noqa: E402
from unipeft.methods.additive.convpass import square_grid  # noqa: E402
from unipeft.testing.backbones import BACKBONES  # noqa: E402


def _bypass(delta, scale: float, act):
    """The bypass written out from the delta's tensors (eval: no dropout)."""
    dw, db = delta.down.weight.detach(), delta.down.bias.detach()
    cw, cb = delta.conv.weight.detach(), delta.conv.bias.detach()
    uw, ub = delta.up.weight.detach(), delta.up.bias.detach()

    def f(h):
        n, length, _ = h.shape
        g = round((length - 1) ** 0.5)
        z = act(F.linear(h, dw, db))
        grid = z[:, 1:].reshape(n, g, g, -1).permute(0, 3, 1, 2)
        patches = F.conv2d(grid, cw, cb, padding=1).permute(0, 2, 3, 1).reshape(n, g * g, -1)
        cls = z[:, :1].reshape(n, 1, 1, -1).permute(0, 3, 1, 2)
        cls = F.conv2d(cls, cw, cb, padding=1).permute(0, 2, 3, 1).reshape(n, 1, -1)
        z = act(torch.cat([cls, patches], dim=1))
        return scale * F.linear(z, uw, ub)

    return f


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


@pytest.mark.parametrize("conv_init,activation", [("xavier", "quick_gelu"), ("identity", "gelu")])
def test_vit_matches_reference(conv_init: str, activation: str) -> None:
    vit = tiny_vit()
    base_out = vit_tokens(vit, IMAGES)
    model = unipeft.apply(
        copy.deepcopy(vit), "convpass", bottleneck=6, scale=0.5, conv_init=conv_init,
        activation=activation,
    )  # fmt: skip
    adapter = model.adapters["default"]
    assert sorted(s.name for s in adapter.sites) == [
        "blocks.0:attn", "blocks.0:mlp", "blocks.1:attn", "blocks.1:mlp",
    ]  # fmt: skip
    assert model.num_trainable_parameters() == 4 * (32 * 6 + 6 + 9 * 36 + 6 + 6 * 32 + 32)
    with torch.no_grad():
        close(model.base_model.forward_features(IMAGES), base_out, "convpass at init vs base")
    if conv_init == "identity":
        w = adapter.delta_at("blocks.0:attn").conv.weight
        assert torch.equal(w[:, :, 1, 1], torch.eye(6)) and w.abs().sum() == 6
    randomise(model.deltas.parameters(), seed=1)
    act = _quick_gelu if activation == "quick_gelu" else F.gelu
    beside = {
        (i, part): _bypass(adapter.delta_at(f"blocks.{i}:{part}"), 0.5, act)
        for i in range(2)
        for part in ("attn", "mlp")
    }
    with torch.no_grad():
        got = model.base_model.forward_features(IMAGES)
    want = vit_tokens(vit, IMAGES, beside=beside)
    close(got, want, f"convpass ({conv_init}, {activation}) vs reference", base=base_out)


def test_grid_is_inferred_from_the_token_count() -> None:
    assert square_grid(17, 8) == (1, 4)  # class token + 4x4 patches
    assert square_grid(201, 8) == (5, 14)  # class token + 4 registers + 14x14
    assert square_grid(196, 8) == (0, 14)  # no prefix token
    with pytest.raises(ValueError, match=r"not a square grid.*max_prefix_tokens"):
        square_grid(1 + 14 * 20, 8)  # a 14x20 grid: not square
    model = unipeft.apply(tiny_vit(), "convpass", max_prefix_tokens=2)
    delta = model.adapters["default"].delta_at("blocks.0:mlp")
    with pytest.raises(ValueError, match="21 tokens are not a square grid"):
        delta(torch.randn(2, 21, 32), torch.randn(2, 21, 32))


def test_register_tokens() -> None:
    """A timm ViT with 4 register tokens: 5 prefix tokens before the 4x4 grid."""
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
        depth=2, num_heads=2, num_classes=10, reg_tokens=4,
    ).eval()  # fmt: skip
    model = unipeft.apply(vit, "convpass")
    randomise(model.deltas.parameters(), seed=2)
    with torch.no_grad():
        out = model(IMAGES)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_refusals() -> None:
    with pytest.raises(TargetError, match="not in a vision transformer"):
        unipeft.apply(BACKBONES["bert"].make(), "convpass", targets=["attn"])
    with pytest.raises(TargetError, match=r"match nothing method 'convpass' can attach to"):
        unipeft.apply(BACKBONES["llama"].make(), "convpass")
    with pytest.raises(TargetError, match="video model"):
        unipeft.apply(BACKBONES["videomae"].make(), "convpass", targets=["mlp"])
    with pytest.raises(TargetError, match="text tower"):
        unipeft.apply(BACKBONES["open_clip"].make(), "convpass", targets=["text/attn"])
    with pytest.raises(TargetError, match="not a sublayer"):
        unipeft.apply(tiny_vit(), "convpass", targets=["mlp.up"])
    # open_clip: the default targets take the image tower and skip the text tower
    model = unipeft.apply(BACKBONES["open_clip"].make(), "convpass")
    assert {s.tower for s in model.adapters["default"].sites} == {"visual"}
