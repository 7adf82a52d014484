"""The CLIP classifier head (unipeft.clip): zero-shot logits as CLIP computes them, on a
plain CLIP and through adapters in either tower, with the text features cached only while
nothing they depend on can change."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import unipeft
from unipeft.clip import WordTokenizer, zero_shot_head
from unipeft.testing.backbones import BACKBONES

CLASSES = ["cat", "dog", "bird"]
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.")


@pytest.fixture
def clip():
    torch.manual_seed(0)
    return BACKBONES["open_clip"].make()


@pytest.fixture
def tok() -> WordTokenizer:
    return WordTokenizer(100, 12, words=["a", "photo", "of", "drawing", ".", *CLASSES])


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def hand_zero_shot(clip, tok, pixels: torch.Tensor) -> torch.Tensor:
    """CLIP's zero-shot recipe written out: normalised prompt features averaged per class,
    normalised again; cosine similarities scaled by exp(logit_scale)."""
    with torch.no_grad():
        rows = []
        for c in CLASSES:
            t = clip.encode_text(tok([tpl.format(c) for tpl in TEMPLATES]))
            rows.append(F.normalize(F.normalize(t, dim=-1).mean(0), dim=-1))
        text = torch.stack(rows)
        img = F.normalize(clip.encode_image(pixels), dim=-1)
        return clip.logit_scale.exp() * img @ text.T


def test_zero_shot_head_is_clips_recipe(clip, tok) -> None:
    head = zero_shot_head(clip, CLASSES, templates=TEMPLATES, tokenizer=tok)
    with torch.no_grad():
        got = head(images())
    want = hand_zero_shot(copy.deepcopy(clip), tok, images())
    assert got.shape == (4, 3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert head.text_features().shape == (3, clip.text_projection.shape[1])


def test_head_runs_adapters_in_the_image_tower_and_caches_text(clip, tok) -> None:
    base = copy.deepcopy(clip)
    model = unipeft.apply(clip, "lora", r=2, targets=["visual/attn.q", "visual/attn.v"])
    for p in model.deltas.parameters():
        torch.nn.init.normal_(p, std=0.1)
    head = zero_shot_head(model, CLASSES, templates=TEMPLATES, tokenizer=tok)
    plain = zero_shot_head(base, CLASSES, templates=TEMPLATES, tokenizer=tok)
    with torch.no_grad():
        t1 = head.text_features()
        t2 = head.text_features()
        assert t1 is t2  # cached: no text-side delta
        torch.testing.assert_close(t1, plain.text_features(), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(head(images()), plain(images()))


def test_text_side_adapters_recompute_while_training_and_after_steps(clip, tok) -> None:
    model = unipeft.apply(clip, "lora", r=2, targets=["text/attn.v"])
    for p in model.deltas.parameters():
        torch.nn.init.normal_(p, std=0.1)
    head = zero_shot_head(model, CLASSES, templates=TEMPLATES, tokenizer=tok)
    logits = head(images())
    assert logits.requires_grad
    logits.logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.deltas.parameters()]
    assert all(g is not None for g in grads)
    with torch.no_grad():
        before = head.text_features()
        assert head.text_features() is before  # nothing changed: cached
        opt = torch.optim.SGD(model.deltas.parameters(), lr=1.0)
        opt.step()  # bumps the parameters' versions: the cache key changes
        after = head.text_features()
    assert after is not before and not torch.allclose(after, before)


def test_bad_inputs_are_named(clip, tok) -> None:
    with pytest.raises(ValueError, match="classnames is empty"):
        zero_shot_head(clip, [], tokenizer=tok)
    with pytest.raises(ValueError, match="needs a '\\{\\}'"):
        zero_shot_head(clip, CLASSES, templates=("a photo",), tokenizer=tok)
    big = WordTokenizer(1000, 12)
    with pytest.raises(ValueError, match="vocabulary has 100 tokens"):
        zero_shot_head(clip, CLASSES, tokenizer=big)
    with pytest.raises(TypeError, match="no 'encode_image'"):
        zero_shot_head(torch.nn.Linear(2, 2), CLASSES, tokenizer=tok)


def test_word_tokenizer_follows_open_clip_conventions() -> None:
    tok = WordTokenizer(50, 8, words=["a", "cat"])
    ids = tok(["a cat.", "a very long sentence that will be cut off here"])
    assert ids.shape == (2, 8)
    assert ids[0, :4].tolist() == [48, 1, 2, tok.token_id(".")]
    assert ids[0, 4].item() == 49 and ids[0, 5:].eq(0).all()
    assert ids[1, -1].item() == 49  # truncated, the end token kept
    assert (ids.argmax(-1) == torch.tensor([4, 7])).all()  # EOT is the largest id


def test_default_tokenizer_is_open_clips_bpe() -> None:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    clip = CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
    ).eval()
    head = zero_shot_head(clip, CLASSES)
    assert head.template_ids.shape == (3, 16)
    assert head.template_ids[0, 0].item() == 49406  # open_clip's start token
    with torch.no_grad():
        assert head(images(2)).shape == (2, 3)
