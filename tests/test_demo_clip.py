"""The demo's CLIP base-to-novel task: its data split, shift, tokenizer, objective and rows."""

from __future__ import annotations

import pytest
import torch

from unipeft.demo.clip import harmonic_mean, recipes
from unipeft.demo.clipmodel import (
    TEMPLATES,
    CaptionTargets,
    ContrastiveCLIP,
    WordTokenizer,
    default_tokenizer,
    small_clip,
)
from unipeft.demo.data import DIGIT_NAMES, digits_base_to_novel_split, shift_domain


def test_base_to_novel_split_is_disjoint_few_shot_and_seeded() -> None:
    d = digits_base_to_novel_split(0, shots=16, val_shots=8)
    assert (d.base, d.novel) == ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
    assert d.train_y.bincount().tolist() == [16] * 5
    assert d.val_y.bincount().tolist() == [8] * 5
    assert set(d.base_test_y.tolist()) == set(d.novel_test_y.tolist()) == set(range(5))
    assert set(d.pretrain_y.tolist()) == set(range(10))  # every digit pretrains (clean)
    sets = [d.pretrain_x, d.train_x, d.val_x, d.base_test_x, d.novel_test_x]
    assert sum(len(s) for s in sets) == 1797  # every image once
    again, other = digits_base_to_novel_split(0), digits_base_to_novel_split(1)
    assert torch.equal(again.novel_test_x, d.novel_test_x)
    assert not torch.equal(other.train_x, d.train_x)


def test_shift_is_a_rotation_and_a_tint_of_the_clean_images() -> None:
    clean = -torch.ones(1, 3, 32, 32)
    clean[..., 4:28, 14:18] = 1.0  # a vertical bar
    shifted = shift_domain(clean)
    assert shifted.shape == clean.shape
    # the background stays background, tinted; the bar is no longer vertical
    assert shifted[0, :, 0, 0].tolist() == pytest.approx([-1.0, -0.6, -0.3])
    assert not torch.allclose(shifted[0, 0], clean[0, 0])
    assert shifted[0, 0].max() > 0.9 and shifted[0, 2].max() < 0.31


def test_word_tokenizer_puts_eot_at_the_largest_id() -> None:
    tok = default_tokenizer()
    ids = tok(["a photo of the digit three.", "the number nine."])
    assert ids.shape == (2, tok.context_length)
    assert (ids[:, 0] == tok.sot).all()
    # [SOT] a photo of the digit three . [EOT]: open_clip pools at the argmax, the EOT
    assert ids.argmax(-1).tolist() == [8, 5]
    assert ids[1, 6:].eq(0).all()
    with pytest.raises(ValueError, match="'cat'"):
        tok(["a photo of a cat."])
    assert WordTokenizer(["a", "a", "b"]).vocab_size == 5


def test_contrastive_targets_spread_over_the_digits_captions() -> None:
    tok = default_tokenizer()
    data = CaptionTargets("pixels", torch.zeros(3, 3, 32, 32), torch.tensor([3, 0, 3]))
    inputs, targets = data.__getitems__([0, 1])
    assert inputs["pixels"].shape == (2, 3, 32, 32)
    assert targets.shape == (2, len(DIGIT_NAMES) * len(TEMPLATES))
    assert targets.sum(1).tolist() == pytest.approx([1.0, 1.0])
    assert targets[0].nonzero().flatten().tolist() == [12, 13, 14, 15]  # digit 3's captions
    clip = small_clip(tok.vocab_size, depth=1, text_depth=1)
    logits = ContrastiveCLIP(clip, tok)(inputs["pixels"])
    assert logits.shape == targets.shape


def test_harmonic_mean() -> None:
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.48 / 1.4)
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(1.0, 0.0) == 0.0


def test_clip_rows_cover_the_baselines_and_the_clip_methods() -> None:
    names = [r.name for r in recipes(False)]
    assert names[:4] == ["zero-shot", "linear probe", "full fine-tuning", "lora"]
    assert {"coop", "cocoop", "maple", "clip_adapter"} <= set(names)
    lora = next(r for r in recipes(False) if r.name == "lora")
    assert lora.targets == ["attn.q", "attn.v"]  # both towers: the roles match in each
