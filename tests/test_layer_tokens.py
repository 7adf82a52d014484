"""Per-block token sequences (role ``layer_tokens``, sites ``<block>:tokens``): where the
structure maps put them, that soft tokens there enter one block and leave it (nothing leaks
into the next block), zero-length prompts, CLIP's text tower staying causal, and several
adapters at once."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

import unipeft
from unipeft import TargetError
from unipeft.testing.backbones import BACKBONES

VISION = ["hf_vit", "timm_vit", "open_clip", "videomae"]
BLOCKS = {
    "hf_vit": ("layers.{}", 1),
    "timm_vit": ("blocks.{}", 1),
    "videomae": ("encoder.layer.{}", 1),
}


def layer_sites(name: str) -> list:
    return [s for s in unipeft.inspect_sites(BACKBONES[name].make()) if s.role == "layer_tokens"]


def randomise(model: unipeft.DeltaModel, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.deltas.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("name", list(BLOCKS))
def test_one_sequence_per_block(name: str) -> None:
    path, index = BLOCKS[name]
    model = BACKBONES[name].make()
    sites = [s for s in unipeft.inspect_sites(model) if s.role == "layer_tokens"]
    assert [s.name for s in sites] == [path.format(i) + ":tokens" for i in range(2)]
    assert [s.layer for s in sites] == [0, 1]
    assert {(s.style, s.index, s.batch_first, s.kind) for s in sites} == {
        ("container", index, True, "sequence")
    }
    for i, s in enumerate(sites):  # the block itself takes the tokens in and out
        assert s.insert is s.strip is model.get_submodule(path.format(i))
    # the model-level sequence is still there, and still what prompt_tuning targets
    assert [s.name for s in unipeft.inspect_sites(model) if s.role == "tokens"] == ["tokens"]
    dm = unipeft.apply(model, "prompt_tuning")
    assert [s.name for s in dm.adapters["default"].sites] == ["tokens"]


def test_open_clip_has_them_in_both_towers() -> None:
    sites = layer_sites("open_clip")
    got = {(s.tower, s.layer, s.name, s.index) for s in sites}
    assert got == {
        ("visual", 0, "visual.transformer.resblocks.0:tokens", 1),  # after the class token
        ("visual", 1, "visual.transformer.resblocks.1:tokens", 1),
        ("text", 0, "transformer.resblocks.0:tokens", 0),  # where the text `tokens` go
        ("text", 1, "transformer.resblocks.1:tokens", 0),
    }


def test_text_models_have_none() -> None:
    for name in ("bert", "gpt2", "llama"):
        assert layer_sites(name) == []
    with pytest.raises(TargetError, match="'layer_tokens' matches nothing"):
        unipeft.apply(BACKBONES["bert"].make(), "prompt_tuning", targets=["layer_tokens"])


@pytest.mark.parametrize(
    ("target", "count"),
    [("layer_tokens", 4), ("visual/layer_tokens", 2), ("text/layer_tokens[1]", 1)],
)
def test_role_targets_with_towers_and_layers(target: str, count: int) -> None:
    model = unipeft.apply(BACKBONES["open_clip"].make(), "prompt_tuning", targets=[target])
    assert len(model.adapters["default"].sites) == count


@pytest.mark.parametrize("name", VISION)
def test_zero_length_prompts_change_nothing(name: str) -> None:
    bb = BACKBONES[name]
    model = bb.make()
    x = bb.sample()
    dm = unipeft.apply(model, "prompt_tuning", num_tokens=2, targets=["layer_tokens"])
    for delta in dm.deltas["default"].values():
        width = delta.prompt.shape[1]
        delta.tokens = lambda n, w=width: torch.zeros(n, 0, w)
    with torch.no_grad():
        got = bb.run(model, x)
        with dm.disable():
            assert torch.equal(got, bb.run(model, x))


@pytest.mark.parametrize("name", VISION)
def test_real_prompts_at_every_block(name: str) -> None:
    bb = BACKBONES[name]
    model = bb.make()
    x = bb.sample()
    with torch.no_grad():
        base = bb.run(model, x)
    dm = unipeft.apply(model, "prompt_tuning", num_tokens=3, targets=["layer_tokens"])
    randomise(dm)
    with torch.no_grad():
        out = bb.run(model, x)
        with dm.disable():
            off = bb.run(model, x)
    assert out.shape == base.shape
    assert (out - base).abs().max() > 1e-3
    # (open_clip's attention takes another kernel once its weights are frozen: ~1e-6)
    torch.testing.assert_close(off, base, atol=1e-5, rtol=0)
    dm.unload()
    with torch.no_grad():
        torch.testing.assert_close(bb.run(model, x), base, atol=1e-5, rtol=0)


def _timm_reference(vit, images: Tensor, prompts: list[Tensor]) -> Tensor:
    """forward_features of a clean timm ViT with ``prompts[i]`` put after the class token at
    block i's input and dropped from its output."""
    with torch.no_grad():
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        for blk, p in zip(vit.blocks, prompts, strict=True):
            n = p.shape[0]
            x = torch.cat([x[:, :1], p.expand(len(x), -1, -1), x[:, 1:]], dim=1)
            x = blk(x)
            x = torch.cat([x[:, :1], x[:, 1 + n :]], dim=1)
        return vit.norm(x)


def test_timm_matches_a_hand_written_forward_and_nothing_leaks() -> None:
    bb = BACKBONES["timm_vit"]
    model = bb.make()
    clean = copy.deepcopy(model)
    images = bb.sample()["pixels"]
    dm = unipeft.apply(model, "prompt_tuning", num_tokens=3, targets=["layer_tokens"])
    randomise(dm)
    adapter = dm.adapters["default"]
    prompts = [adapter.delta_at(s).prompt.detach() for s in adapter.sites]
    seen: list[Tensor] = []
    # registered after the adapter's own hook: sees block 1's input with its prompts in
    model.blocks[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        got = model.forward_features(images)
    want = _timm_reference(clean, images, prompts)
    diff = (got - want).abs().max().item()
    print(f"timm per-block prompts vs reference: max |diff| = {diff:.3e}")
    assert diff <= 1e-5 * max(1.0, want.abs().max().item())
    # block 1 sees its own 3 prompts, exactly, and none of block 0's outputs at those places
    assert seen[0].shape == (2, 1 + 3 + 16, 32)
    assert torch.equal(seen[0][:, 1:4], prompts[1].expand(2, -1, -1))
    # and the reference with block 0's prompt outputs kept differs: dropping them matters
    assert (got - _timm_reference(clean, images, [prompts[0], prompts[1][:0]])).abs().max() > 1e-3


def test_per_block_and_model_level_prompts_together() -> None:
    """prompt_tuning at ``tokens`` (VPT-shallow) and other tokens at every block, as two
    adapters: both insert, both strip, and each alone changes the output."""
    bb = BACKBONES["timm_vit"]
    model = bb.make()
    x = bb.sample()
    dm = unipeft.apply(model, "prompt_tuning", num_tokens=2)
    dm.add_adapter("deep", "prompt_tuning", num_tokens=3, targets=["layer_tokens"])
    randomise(dm)
    seen: list[tuple] = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    with torch.no_grad():
        outs = {}
        for active in (["default"], ["deep"], ["default", "deep"]):
            dm.set_active(active)
            outs[tuple(active)] = bb.run(model, x)
    assert seen == [(2, 1 + 2 + 16, 32), (2, 1 + 3 + 16, 32), (2, 1 + 3 + 2 + 16, 32)]
    assert len({o.shape for o in outs.values()}) == 1
    a, b, both = outs.values()
    assert (a - b).abs().max() > 1e-3 and (both - a).abs().max() > 1e-3


def test_clip_text_blocks_stay_causal() -> None:
    bb = BACKBONES["open_clip"]
    model = bb.make()
    dm = unipeft.apply(model, "prompt_tuning", num_tokens=3, targets=["text/layer_tokens"])
    randomise(dm)
    grabbed: list[Tensor] = []
    model.transformer.register_forward_hook(lambda m, a, out: grabbed.append(out))
    text = torch.randint(1, 100, (1, 12), generator=torch.Generator().manual_seed(1))
    changed = text.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 100
    with torch.no_grad():
        model.encode_text(text)
        model.encode_text(changed)
        with dm.disable():
            model.encode_text(text)
    a, b, plain = grabbed
    assert a.shape == (1, 12, 32)
    torch.testing.assert_close(a[0, :8], b[0, :8])  # earlier tokens cannot see later ones
    assert not torch.allclose(a[0, 8:], b[0, 8:])
    assert not torch.allclose(a, plain)  # the prompts are attended


def test_clip_with_gradient_checkpointing() -> None:
    """open_clip's checkpointed blocks are called as ``(x, None, None, attn_mask)``: the
    text tower's mask is found by name and widened there too."""
    bb = BACKBONES["open_clip"]
    model = bb.make()
    x = bb.sample()
    dm = unipeft.apply(model, "prompt_tuning", num_tokens=3, targets=["layer_tokens"])
    randomise(dm)
    with torch.no_grad():
        want = bb.run(model, x)
    model.set_grad_checkpointing(True)
    model.train()
    got = bb.run(model, x)
    got.sum().backward()
    assert torch.allclose(got, want, atol=1e-6)
    assert all(p.grad is not None for p in dm.deltas.parameters())
