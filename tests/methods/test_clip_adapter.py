"""CLIP-Adapter on the tiny open_clip: the image feature becomes α·A(f) + (1 − α)·f, the
text features stay cached in the head, and the other sites are refused. (PEFT has no
CLIP-Adapter, so there is no parity test.)"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import unipeft
from unipeft.clip import WordTokenizer, zero_shot_head
from unipeft.testing.backbones import BACKBONES


@pytest.fixture
def clip():
    return BACKBONES["open_clip"].make()


def pixels(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_image_feature_is_the_residual_blend(clip) -> None:
    base = copy.deepcopy(clip)
    model = unipeft.apply(clip, "clip_adapter", alpha=0.3, reduction=2)
    delta = model.deltas["default"]["visual"]
    with torch.no_grad():
        f = base.encode_image(pixels())
        a = F.relu(F.relu(f @ delta.down.weight.T) @ delta.up.weight.T)
        want = 0.3 * a + 0.7 * f
        got = model.encode_image(pixels())
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got, f)
    assert model.num_trainable_parameters() == 2 * 16 * 8
    # mirrored first layer: for any feature, half of the hidden units fire
    assert (F.relu(f @ delta.down.weight.T) > 0).sum(-1).ge(4).all()


def test_head_trains_the_adapter_and_keeps_text_cached(clip) -> None:
    model = unipeft.apply(clip, "clip_adapter", bottleneck=6)
    assert model.num_trainable_parameters() == 2 * 16 * 6
    head = zero_shot_head(model, ["cat", "dog"], tokenizer=WordTokenizer(100, 12))
    text = head.text_features()
    F.cross_entropy(head(pixels(2)), torch.tensor([0, 1])).backward()
    assert head.text_features() is text  # no text-side delta: computed once
    grads = [p.grad for p in model.deltas.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_refusals(clip) -> None:
    for target in ("visual.transformer", "ln_final", "embed"):
        with pytest.raises(unipeft.TargetError, match="CLIP tower's output feature"):
            unipeft.apply(copy.deepcopy(clip), "clip_adapter", targets=[target])
    with pytest.raises(unipeft.TargetError, match="match nothing"):
        unipeft.apply(BACKBONES["bert"].make(), "clip_adapter")
    with pytest.raises(unipeft.ConfigError, match="alpha"):
        unipeft.apply(copy.deepcopy(clip), "clip_adapter", alpha=0.0)
