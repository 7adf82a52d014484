"""Soft prompts: mask handling on text, VPT placement on vision, causality on CLIP text."""

from __future__ import annotations

import pytest
import torch
from _matrix import ENCODERS, backbones

import unipeft
from unipeft.testing.backbones import BACKBONES


@pytest.mark.parametrize("name", backbones(family="text"))
def test_padding_is_masked_and_prompts_are_attended(name: str) -> None:
    """A padded sequence gives the same outputs on its real tokens as the unpadded one."""
    bb = BACKBONES[name]
    model = unipeft.apply(bb.make(), "prompt_tuning", num_tokens=3)
    ids = torch.randint(1, 100, (1, 5), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([ids, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        alone = model(input_ids=ids).last_hidden_state
        both = model(input_ids=padded, attention_mask=mask).last_hidden_state
        with model.disable():
            plain = model(input_ids=ids).last_hidden_state
    assert alone.shape == (1, 5, 32) and both.shape == (1, 7, 32)
    torch.testing.assert_close(both[:, :5], alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(alone, plain), "the prompts had no effect"


def test_inputs_embeds_also_get_prompts() -> None:
    bb = BACKBONES["bert"]
    model = unipeft.apply(bb.make(), "prompt_tuning", num_tokens=2)
    ids = torch.randint(1, 100, (2, 4))
    with torch.no_grad():
        from_ids = model(input_ids=ids).last_hidden_state
        embeds = model.get_input_embeddings()(ids)
        from_embeds = model(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(from_ids, from_embeds)


def test_vpt_prompts_go_after_the_class_token() -> None:
    bb = BACKBONES["timm_vit"]
    model = unipeft.apply(bb.make(), "prompt_tuning", num_tokens=4)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    prompt = model.deltas["default"]["tokens"].prompt
    with torch.no_grad():
        feats = model.forward_features(bb.sample(0)["pixels"])
    assert feats.shape == (2, 1 + 16, 32)  # prompts stripped again
    assert seen[0].shape == (2, 1 + 4 + 16, 32)
    assert torch.equal(seen[0][0, 1:5], prompt)


def test_clip_text_prompts_keep_causality() -> None:
    bb = BACKBONES["open_clip"]
    model = unipeft.apply(bb.make(), "prompt_tuning", num_tokens=3, targets=["text/tokens"])
    grabbed = []
    model.transformer.register_forward_hook(lambda m, a, out: grabbed.append(out))
    text = torch.randint(1, 100, (1, 12), generator=torch.Generator().manual_seed(1))
    changed = text.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 100
    with torch.no_grad():
        model.encode_text(text)
        model.encode_text(changed)
    a, b = grabbed
    assert a.shape == (1, 12, 32)
    torch.testing.assert_close(a[0, :8], b[0, :8])  # earlier tokens cannot see later ones
    assert not torch.allclose(a[0, 8:], b[0, 8:])


@pytest.mark.parametrize("name", backbones(family="text", exclude=ENCODERS))
def test_generation_with_a_kv_cache_matches_uncached_decoding(name: str) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    # the tiny backbone's own config, with the causal language-model head on top
    lm = AutoModelForCausalLM.from_config(BACKBONES[name].make().config)
    model = unipeft.apply(lm.eval(), "prompt_tuning", num_tokens=3, init_std=1.0)
    ids = torch.randint(1, 100, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        current = ids
        for _ in range(6):
            logits = model(input_ids=current, use_cache=False).logits
            assert logits.shape[1] == current.shape[1]  # soft tokens are stripped
            logits[..., 0] = float("-inf")  # min_new_tokens forbids the eos token (0)
            current = torch.cat([current, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, current)


@pytest.mark.parametrize(("name", "limit"), [("bert", 512), ("gpt2", 64), ("llama", None)])
def test_the_token_sequence_knows_its_position_table(name: str, limit: int | None) -> None:
    (site,) = [s for s in unipeft.inspect_sites(BACKBONES[name].make()) if s.kind == "sequence"]
    assert site.max_length == limit


def test_soft_tokens_must_leave_room_in_the_position_table() -> None:
    """GPT-2's table holds 64 positions: 63 soft tokens fit (one input token left), 64
    are refused at apply with the limit, and an input too long with the prompts is
    refused on the forward pass with the longest length that fits; the model still works."""
    bb = BACKBONES["gpt2"]
    with pytest.raises(unipeft.ConfigError, match=r"num_tokens=64 .* must be <= 63"):
        unipeft.apply(bb.make(), "prompt_tuning", num_tokens=64)
    model = unipeft.apply(bb.make(), "prompt_tuning", num_tokens=63)
    with torch.no_grad():
        assert model(torch.ones(1, 1, dtype=torch.long)).last_hidden_state.shape == (1, 1, 32)
        with pytest.raises(ValueError, match="at most 1 input tokens"):
            model(torch.ones(1, 2, dtype=torch.long))
        assert model(torch.ones(2, 1, dtype=torch.long)).last_hidden_state.shape == (2, 1, 32)
        with model.disable():  # without the prompts the whole table is the input's
            assert model(torch.ones(1, 64, dtype=torch.long)).last_hidden_state.shape[1] == 64
