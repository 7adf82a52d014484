"""Visual prompting: the frame added through the stem equals the plain network on x + p."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import unipeft
from unipeft import ConfigError, TargetError
from unipeft.methods.additive.visual_prompt import VisualPromptDelta
from unipeft.testing.backbones import BACKBONES

RESNET, CONVNEXT, VIT = BACKBONES["resnet"], BACKBONES["convnext"], BACKBONES["timm_vit"]


def _delta(model) -> VisualPromptDelta:
    return next(m for m in model.deltas.modules() if isinstance(m, VisualPromptDelta))


def _randomise(model) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("bb", [RESNET, CONVNEXT, VIT], ids=["resnet", "convnext", "timm_vit"])
@pytest.mark.parametrize("size", [32, 40])
def test_the_network_sees_the_framed_image(bb, size: int) -> None:
    targets = ["embed"] if bb is VIT else None
    model = unipeft.apply(bb.make(), "visual_prompt", targets=targets, padding=4, resolution=32)
    x = {"pixels": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))}
    if bb is VIT and size != 32:
        pytest.skip("the tiny ViT takes 32x32 images only")
    with torch.no_grad():
        torch.testing.assert_close(bb.run(model, x), bb.run(bb.make(), x))  # zero at init
        _randomise(model)
        frame = _delta(model).prompt(size, size, torch.float32)
        inside = frame[..., 5:-5, 5:-5]
        assert torch.equal(inside, torch.zeros_like(inside)) and frame.abs().sum() > 0
        expected = bb.run(bb.make(), {"pixels": x["pixels"] + frame})
        torch.testing.assert_close(bb.run(model, x), expected, atol=1e-5, rtol=1e-4)


def test_the_frame_is_the_stored_one_at_its_resolution_and_resized_otherwise() -> None:
    model = unipeft.apply(RESNET.make(), "visual_prompt", padding=4, resolution=32)
    _randomise(model)
    delta = _delta(model)
    frame = delta.prompt(32, 32, torch.float32)[0]
    assert torch.equal(frame[:, :4, :], delta.top) and torch.equal(frame[:, -4:, :], delta.bottom)
    assert torch.equal(frame[:, 4:-4, :4], delta.left)
    bigger = delta.prompt(64, 48, torch.float32)
    assert bigger.shape == (1, 3, 64, 48)
    assert bigger[0, :, 8:-8, 6:-6].abs().sum() == 0  # 4/32 of each side
    # the parameter count is the formula's, on the tiny ResNet's 3-channel stem
    assert model.num_trainable_parameters() == 3 * (2 * 4 * 32 + 2 * 24 * 4)


def test_trains_and_saves(tmp_path: Path) -> None:
    x = RESNET.sample(0)
    model = unipeft.apply(RESNET.make(), "visual_prompt", padding=4, resolution=32)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        loss = RESNET.run(model, x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = RESNET.run(model, x)
    assert (out - RESNET.run(RESNET.make(), x)).abs().max() > 1e-4
    model.save(tmp_path)
    loaded = unipeft.load(RESNET.make(), tmp_path)
    with torch.no_grad():
        assert torch.equal(RESNET.run(loaded, x), out)


def test_refusals_name_the_site_kind() -> None:
    with pytest.raises(TargetError, match="is a linear projection; visual_prompt"):
        unipeft.apply(RESNET.make(), "visual_prompt", targets=["head"])
    with pytest.raises(TargetError, match="'stem' matches nothing on BertModel"):
        unipeft.apply(BACKBONES["bert"].make(), "visual_prompt")
    with pytest.raises(ConfigError, match="padding=16 leaves no inside"):
        unipeft.apply(RESNET.make(), "visual_prompt", padding=16, resolution=32)
    model = unipeft.apply(RESNET.make(), "visual_prompt", padding=4, resolution=32)
    with pytest.raises(ValueError, match="leaves no inside for a frame"):
        RESNET.run(model, {"pixels": torch.randn(2, 3, 2, 2)})
