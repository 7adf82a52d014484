"""MaPLe on the tiny open_clip: one shared module holds the text prompts and the couplings;
the image prompts are F_j(P_j); both towers equal a hand-written MaPLe forward. (PEFT has
no MaPLe, so there is no parity test.)"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import unipeft
from unipeft.clip import WordTokenizer, zero_shot_head
from unipeft.testing.backbones import BACKBONES

CLASSES = ["cat", "dog", "bird"]


@pytest.fixture
def clip():
    return BACKBONES["open_clip"].make()


@pytest.fixture
def tok() -> WordTokenizer:
    return WordTokenizer(100, 12, words=["a", "photo", "of", ".", *CLASSES])


def pixels(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def _put(x: torch.Tensor, start: int, prompt: torch.Tensor) -> torch.Tensor:
    p = prompt.expand(len(x), -1, -1)
    return torch.cat([x[:, :start], p, x[:, start + p.shape[1] :]], dim=1)


def hand_image(clip, shared, x: torch.Tensor) -> torch.Tensor:
    """MaPLe's image tower written out: prompts F_0(P_0) after CLS, replaced before blocks
    1..J-1 by F_j(P_j), dropped at the end."""
    v = clip.visual
    prompts = [
        shared.text_prompts[j] @ shared.coupling_weight[j].T + shared.coupling_bias[j]
        for j in range(shared.depth)
    ]
    m = prompts[0].shape[0]
    h = v._embeds(x)
    h = torch.cat([h[:, :1], prompts[0].expand(len(h), -1, -1), h[:, 1:]], dim=1)
    for j, block in enumerate(v.transformer.resblocks):
        if 1 <= j < shared.depth:
            h = _put(h, 1, prompts[j])
        h = block(h)
    h = torch.cat([h[:, :1], h[:, 1 + m :]], dim=1)
    pooled, _ = v._pool(h)
    return pooled @ v.proj


def hand_text(clip, shared, ids: torch.Tensor) -> torch.Tensor:
    """MaPLe's text tower: P_0 over the placeholder embeddings, P_j before blocks 1..J-1."""
    h = _put(clip.token_embedding(ids), 1, shared.text_prompts[0]) + clip.positional_embedding
    for j, block in enumerate(clip.transformer.resblocks):
        if 1 <= j < shared.depth:
            h = _put(h, 1, shared.text_prompts[j])
        h = block(h, attn_mask=clip.attn_mask)
    h = clip.ln_final(h)[torch.arange(len(ids)), ids.argmax(-1)]
    return h @ clip.text_projection


def test_both_towers_are_the_papers_forward(clip, tok) -> None:
    base = copy.deepcopy(clip)
    model = unipeft.apply(clip, "maple", n_ctx=2, depth=2)
    shared = model.adapters["default"].shared
    assert shared.depth == 2 and shared.text_prompts.shape == (2, 2, 32)
    head = zero_shot_head(model, CLASSES, tokenizer=tok)
    ids = head.context_ids(2)
    with torch.no_grad():
        d_img = (model.encode_image(pixels()) - hand_image(base, shared, pixels())).abs().max()
        d_txt = (model.encode_text(ids) - hand_text(base, shared, ids)).abs().max()
    print(f"\nmaple vs hand-written MaPLe: image {d_img:.2e}, text {d_txt:.2e}")
    assert d_img < 1e-5 and d_txt < 1e-5


def test_image_prompts_are_coupled_to_the_text_prompts(clip) -> None:
    model = unipeft.apply(clip, "maple", n_ctx=2, depth=2)
    shared = model.adapters["default"].shared
    x = pixels()
    with torch.no_grad():
        before = model.encode_image(x)
        shared.text_prompts[1].add_(0.5)  # a text prompt moves: the image tower follows
        after = model.encode_image(x)
        vision = shared.image_prompts()
        for j in range(2):
            want = shared.text_prompts[j] @ shared.coupling_weight[j].T + shared.coupling_bias[j]
            torch.testing.assert_close(vision[j], want)
    assert not torch.allclose(before, after)


def test_one_shared_module_trains_everything(clip, tok) -> None:
    model = unipeft.apply(clip, "maple", n_ctx=2, depth=9)
    names = sorted(s.name for s in model.adapters["default"].sites)
    assert names == [
        "token_embedding",
        "transformer.resblocks.0:block",
        "transformer.resblocks.1:block",
        "visual.tokens",
        "visual.transformer.resblocks.0:block",
        "visual.transformer.resblocks.1:block",
    ]
    shared = model.adapters["default"].shared
    assert shared.depth == 2  # capped by the image tower's two blocks
    assert model.num_trainable_parameters() == 2 * 2 * 32 + 2 * (32 * 32 + 32)
    head = zero_shot_head(model, CLASSES, tokenizer=tok)
    F.cross_entropy(head(pixels()), torch.tensor([0, 1, 2])).backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {
        "deltas.default.__shared__.text_prompts",
        "deltas.default.__shared__.coupling_weight",
        "deltas.default.__shared__.coupling_bias",
    }


def test_depth_one_is_shallow_and_refusals_are_clear(clip) -> None:
    model = unipeft.apply(copy.deepcopy(clip), "maple", depth=1)
    assert len(model.adapters["default"].sites) == 2
    with pytest.raises(ValueError, match="exactly one text token embedding"):
        unipeft.apply(copy.deepcopy(clip), "maple", targets=["text/embed"])
    with pytest.raises(unipeft.TargetError, match="none of them"):
        unipeft.apply(
            copy.deepcopy(clip), "maple", targets=["text/embed", "visual/tokens", "attn.q"]
        )
    with pytest.raises(unipeft.TargetError, match="match"):
        unipeft.apply(BACKBONES["bert"].make(), "maple")
