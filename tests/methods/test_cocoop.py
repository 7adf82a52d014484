"""CoCoOp on the tiny open_clip: each image gets its own class text features, from the
context shifted by the meta-net's output for that image; the head hands the image features
to the text-side delta. (PEFT has no CoCoOp, so there is no parity test.)"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import unipeft
from unipeft.clip import WordTokenizer, init_context, zero_shot_head
from unipeft.testing.backbones import BACKBONES

CLASSES = ["cat", "dog", "bird"]


@pytest.fixture
def clip():
    return BACKBONES["open_clip"].make()


@pytest.fixture
def tok() -> WordTokenizer:
    return WordTokenizer(100, 12, words=["a", "photo", "of", ".", *CLASSES])


def pixels(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def hand_cocoop(clip, tok, delta, image: torch.Tensor) -> torch.Tensor:
    """CoCoOp written out for one image: (C, d) normalised class text features."""
    m = delta.num_context
    ctx = delta.ctx + delta.meta_net(image)  # (M, D) + (D,)
    ids = tok([" ".join(["x"] * m) + f" {c}." for c in CLASSES])
    emb = clip.token_embedding(ids)
    emb = torch.cat([emb[:, :1], ctx.expand(len(CLASSES), -1, -1), emb[:, 1 + m :]], dim=1)
    x = clip.transformer(emb + clip.positional_embedding, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)[torch.arange(len(ids)), ids.argmax(-1)] @ clip.text_projection
    return F.normalize(x, dim=-1)


def test_each_image_gets_its_own_text_features(clip, tok) -> None:
    base = copy.deepcopy(clip)
    model = unipeft.apply(clip, "cocoop", n_ctx=2, image_dim=16, reduction=4)
    delta = model.deltas["default"]["token_embedding"]
    head = zero_shot_head(model, CLASSES, tokenizer=tok)
    x = pixels()
    with torch.no_grad():
        got = head(x)
        img = F.normalize(base.encode_image(x), dim=-1)
        want = torch.stack(
            [
                base.logit_scale.exp() * hand_cocoop(base, tok, delta, img[b]) @ img[b]
                for b in range(3)
            ]
        )
    diff = (got - want).abs().max().item()
    print(f"\ncocoop vs hand-written CoCoOp: max |diff| {diff:.2e}")
    assert got.shape == (3, 3) and diff < 1e-4
    # the per-image shift matters: image b's logits differ from using image 0's text
    with torch.no_grad():
        other = base.logit_scale.exp() * hand_cocoop(base, tok, delta, img[0]) @ img[1]
    assert not torch.allclose(other, want[1])


def test_context_and_meta_net_train(clip, tok) -> None:
    model = unipeft.apply(clip, "cocoop", n_ctx=2, image_dim=16, reduction=2)
    head = zero_shot_head(model, CLASSES, tokenizer=tok)
    F.cross_entropy(head(pixels()), torch.tensor([0, 1, 2])).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == {
        "deltas.default.token_embedding.ctx",
        "deltas.default.token_embedding.meta_net.0.weight",
        "deltas.default.token_embedding.meta_net.0.bias",
        "deltas.default.token_embedding.meta_net.2.weight",
        "deltas.default.token_embedding.meta_net.2.bias",
    }
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    d, h = 32, 16 // 2
    assert model.num_trainable_parameters() == 2 * d + 16 * h + h + h * d + d
    assert not any(p.grad is not None for n, p in model.named_parameters() if "deltas" not in n)


def test_without_images_the_meta_net_reads_zero(clip, tok) -> None:
    base = copy.deepcopy(clip)
    model = unipeft.apply(clip, "cocoop", n_ctx=2, image_dim=16)
    delta = model.deltas["default"]["token_embedding"]
    init_context(model, "a photo", tokenizer=tok)
    head = zero_shot_head(model, CLASSES, tokenizer=tok)
    with torch.no_grad():
        got = F.normalize(model.encode_text(head.context_ids(2)), dim=-1)
        want = hand_cocoop(base, tok, delta, torch.zeros(16))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="call the head on images"):
        head.text_features()


def test_image_width_mismatch_names_image_dim(clip, tok) -> None:
    model = unipeft.apply(clip, "cocoop", n_ctx=2)  # image_dim defaults to the text width, 32
    head = zero_shot_head(model, CLASSES, tokenizer=tok)
    with pytest.raises(ValueError, match="image_dim=32"), torch.no_grad():
        head(pixels())
    with pytest.raises(unipeft.TargetError, match="CLIP text tower's token embedding"):
        unipeft.apply(BACKBONES["bert"].make(), "cocoop", targets=["embed"])
