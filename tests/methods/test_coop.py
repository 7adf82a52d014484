"""CoOp on the tiny open_clip: the context overwrites the placeholder embeddings after SOT
(the paper's code), the EOT pooling and causal mask are CLIP's own, a phrase init gives the
zero-shot prompt exactly, class-specific contexts follow the head's class indices, and only
the context trains. (PEFT has no CoOp, so there is no parity test.)"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import unipeft
from unipeft.clip import WordTokenizer, init_context, zero_shot_head
from unipeft.testing.backbones import BACKBONES

CLASSES = ["cat", "dog", "bird"]
WORDS = ["a", "photo", "of", ".", *CLASSES]


@pytest.fixture
def clip():
    return BACKBONES["open_clip"].make()


@pytest.fixture
def tok() -> WordTokenizer:
    return WordTokenizer(100, 12, words=WORDS)


def pixels(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def text_from_embeddings(clip, emb: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's encode_text from given token embeddings, written out."""
    x = emb + clip.positional_embedding
    x = clip.transformer(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    x = x[torch.arange(len(x)), ids.argmax(-1)]
    return x @ clip.text_projection


def hand_coop(clip, tok, ctx: torch.Tensor, classes=CLASSES) -> torch.Tensor:
    """CoOp's prompt learner written out: [SOT][ctx][CLASS][.][EOT] embeddings."""
    m = ctx.shape[-2]
    ids = tok([" ".join(["x"] * m) + f" {c}." for c in classes])
    emb = clip.token_embedding(ids)
    ctx = ctx.expand(len(classes), -1, -1) if ctx.dim() == 2 else ctx
    emb = torch.cat([emb[:, :1], ctx, emb[:, 1 + m :]], dim=1)
    return text_from_embeddings(clip, emb, ids)


def test_coop_text_features_are_the_papers_prompt(clip, tok) -> None:
    base = copy.deepcopy(clip)
    model = unipeft.apply(clip, "coop", n_ctx=3)
    ctx = model.deltas["default"]["token_embedding"].ctx
    head = zero_shot_head(model, CLASSES, tokenizer=tok)
    with torch.no_grad():
        got = head.text_features()
        want = F.normalize(hand_coop(base, tok, ctx.detach()), dim=-1)
        print(f"\ncoop vs hand-written CoOp: max |diff| {(got - want).abs().max():.2e}")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # the EOT is still where open_clip pools: the class tokens moved right by n_ctx
        ids = head.context_ids(3)
        assert (ids.argmax(-1) == tok(["cat."]).argmax(-1) + 3).all()


def test_phrase_init_is_the_zero_shot_prompt(clip, tok) -> None:
    plain = zero_shot_head(copy.deepcopy(clip), CLASSES, ("a photo of a {}.",), tokenizer=tok)
    model = unipeft.apply(clip, "coop", n_ctx=4)
    init_context(model, "a photo of a", tokenizer=tok)
    head = zero_shot_head(model, CLASSES, tokenizer=tok)
    with torch.no_grad():
        diff = (head(pixels()) - plain(pixels())).abs().max().item()
    print(f"\ncoop from 'a photo of a' vs the zero-shot prompt: max |diff| {diff:.2e}")
    assert diff < 1e-5
    with pytest.raises(ValueError, match="has 2 tokens but adapter 'default' learns 4"):
        init_context(model, "a photo", tokenizer=tok)


def test_only_the_context_trains(clip, tok) -> None:
    model = unipeft.apply(clip, "coop", n_ctx=2)
    head = zero_shot_head(model, CLASSES, tokenizer=tok)
    loss = F.cross_entropy(head(pixels()), torch.tensor([0, 1, 2]))
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {"deltas.default.token_embedding.ctx"}
    assert model.num_trainable_parameters() == 2 * 32


def test_class_specific_context_follows_the_class(clip, tok) -> None:
    base = copy.deepcopy(clip)
    model = unipeft.apply(clip, "coop", n_ctx=2, n_classes=3)
    delta = model.deltas["default"]["token_embedding"]
    assert delta.ctx.shape == (3, 2, 32)
    head = zero_shot_head(model, CLASSES, tokenizer=tok)
    with torch.no_grad():
        got = head.text_features()
        want = F.normalize(hand_coop(base, tok, delta.ctx), dim=-1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # without the head's class indices every text gets the mean context
        ids = head.context_ids(2)
        mean = F.normalize(hand_coop(base, tok, delta.ctx.mean(0)), dim=-1)
        torch.testing.assert_close(
            F.normalize(model.encode_text(ids), dim=-1), mean, atol=1e-5, rtol=1e-5
        )
        delta.condition(classes=torch.tensor([0, 5, 1]))
        with pytest.raises(ValueError, match=r"class indices must lie in 0\.\.2"):
            model.encode_text(ids)
        delta.condition()


def test_several_adapters_and_one_context_at_a_time(clip, tok) -> None:
    model = unipeft.apply(clip, "coop", n_ctx=2)
    model.add_adapter("other", "coop", n_ctx=3)
    head = zero_shot_head(model, CLASSES, tokenizer=tok)
    with torch.no_grad():
        a = head(pixels())
        model.set_active("other")
        b = head(pixels())
        assert not torch.allclose(a, b)
        model.set_active(["default", "other"])
        with pytest.raises(ValueError, match="more than one active adapter learns"):
            head(pixels())


def test_refusals_name_the_site_and_the_fix(clip) -> None:
    with pytest.raises(unipeft.TargetError, match="CLIP text tower's token embedding"):
        unipeft.apply(BACKBONES["bert"].make(), "coop", targets=["embed"])
    with pytest.raises(
        unipeft.TargetError, match=r"'visual\.conv1' is a site of role visual/embed"
    ):
        unipeft.apply(copy.deepcopy(clip), "coop", targets=["visual/embed"])
    with pytest.raises(unipeft.ConfigError, match="n_ctx"):
        unipeft.apply(copy.deepcopy(clip), "coop", n_ctx=0)
    model = unipeft.apply(clip, "coop", n_ctx=12)
    with pytest.raises(ValueError, match="at least 14 tokens"):
        model.encode_text(torch.randint(1, 99, (2, 12)))
