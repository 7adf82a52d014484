"""VPT-Deep: the maths against a functional ViT forward written out (new prompts at every
block's input, their outputs dropped), where it goes by default on each vision backbone,
what it refuses, its parameter count, init and prompt dropout."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _vision_ref import IMAGES, _attention, _mlp, close, randomise, tiny_vit
from torch import Tensor

import unipeft
from unipeft import ConfigError, TargetError
from unipeft.testing.backbones import BACKBONES

pytest.importorskip("timm")


def vpt_deep_reference(vit, images: Tensor, prompts: list[Tensor]) -> Tensor:
    """``forward_features`` of the tiny timm ViT written out with VPT-Deep: block i reads
    ``[cls, prompts[i], patches]`` and its outputs at the prompts' places are dropped."""
    with torch.no_grad():
        pe = vit.patch_embed.proj
        x = F.conv2d(images, pe.weight, pe.bias, stride=pe.stride).flatten(2).transpose(1, 2)
        x = torch.cat([vit.cls_token.expand(len(x), -1, -1), x], dim=1) + vit.pos_embed
        for i, (blk, p) in enumerate(zip(vit.blocks, prompts, strict=True)):
            x = torch.cat([x[:, :1], p.expand(len(x), -1, -1), x[:, 1:]], dim=1)
            x = x + _attention(blk, i, x, {}, {}, {})
            x = x + _mlp(blk, i, x, {}, {}, {})
            x = torch.cat([x[:, :1], x[:, 1 + p.shape[0] :]], dim=1)
        return F.layer_norm(x, x.shape[-1:], vit.norm.weight, vit.norm.bias, vit.norm.eps)


def test_matches_the_written_out_forward() -> None:
    vit = tiny_vit()
    clean = copy.deepcopy(vit)
    model = unipeft.apply(vit, "vpt_deep", num_tokens=4)
    randomise(model.deltas.parameters())
    adapter = model.adapters["default"]
    assert [s.name for s in adapter.sites] == ["blocks.0:tokens", "blocks.1:tokens"]
    prompts = [adapter.delta_at(s).prompt.detach() for s in adapter.sites]
    with torch.no_grad():
        got = model.forward_features(IMAGES)
    base = vpt_deep_reference(clean, IMAGES, [p[:0] for p in prompts])
    close(got, vpt_deep_reference(clean, IMAGES, prompts), "timm vpt_deep vs written out", base)
    # the same prompts kept through the stack (not replaced) compute something else
    shallow_only = vpt_deep_reference(clean, IMAGES, [prompts[0], prompts[1][:0]])
    assert (got - shallow_only).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("name", "sites"),
    [
        ("timm_vit", ["blocks.0:tokens", "blocks.1:tokens"]),
        ("hf_vit", ["layers.0:tokens", "layers.1:tokens"]),
        ("videomae", ["encoder.layer.0:tokens", "encoder.layer.1:tokens"]),
        # CLIP: the image tower only
        ("open_clip", [f"visual.transformer.resblocks.{i}:tokens" for i in range(2)]),
    ],
)
def test_default_targets_every_block_of_the_image_tower(name: str, sites: list[str]) -> None:
    bb = BACKBONES[name]
    model = bb.make()
    x = bb.sample()
    with torch.no_grad():
        base = bb.run(model, x)
    dm = unipeft.apply(model, "vpt_deep", num_tokens=3)
    assert [s.name for s in dm.adapters["default"].sites] == sites
    assert dm.num_trainable_parameters() == len(sites) * 3 * 32
    with torch.no_grad():
        out = bb.run(model, x)
    assert out.shape == base.shape and (out - base).abs().max() > 1e-4
    if name == "open_clip":  # the text tower is untouched
        text = bb.sample()["text"]
        with torch.no_grad():
            with dm.disable():
                plain = model.encode_text(text)
            torch.testing.assert_close(model.encode_text(text), plain, atol=0, rtol=0)


def test_refusals() -> None:
    with pytest.raises(TargetError, match=r"\['layer_tokens\?'\] match nothing on BertModel"):
        unipeft.apply(BACKBONES["bert"].make(), "vpt_deep")
    with pytest.raises(TargetError, match=r"is in the text tower.*prompt_tuning"):
        unipeft.apply(BACKBONES["open_clip"].make(), "vpt_deep", targets=["text/layer_tokens"])
    with pytest.raises(TargetError, match="VPT-Shallow"):
        unipeft.apply(BACKBONES["timm_vit"].make(), "vpt_deep", targets=["tokens"])
    with pytest.raises(TargetError, match="sequence"):
        unipeft.apply(BACKBONES["timm_vit"].make(), "vpt_deep", targets=["attn.q"])
    with pytest.raises(ConfigError, match="dropout"):
        unipeft.apply(BACKBONES["timm_vit"].make(), "vpt_deep", dropout=1.0)
    with pytest.raises(ConfigError, match="num_tokens"):
        unipeft.apply(BACKBONES["timm_vit"].make(), "vpt_deep", num_tokens=0)


def test_init_and_prompt_dropout() -> None:
    bb = BACKBONES["timm_vit"]
    dm = unipeft.apply(bb.make(), "vpt_deep", num_tokens=50, dropout=0.5)
    delta = dm.deltas["default"]["blocks__0:tokens"]
    bound = math.sqrt(6 / (768 + 32))  # the paper's Xavier bound, 16-pixel patches
    assert delta.prompt.abs().max() <= bound and delta.prompt.abs().max() > 0.8 * bound
    dm.train()
    a, b = delta.tokens(2), delta.tokens(2)
    assert not torch.equal(a, b) and (a == 0).any()  # dropout in training
    dm.eval()
    assert torch.equal(delta.tokens(2), delta.prompt.expand(2, -1, -1))
    normal = unipeft.apply(bb.make(), "vpt_deep", init="normal", init_std=0.5)
    std = normal.deltas["default"]["blocks__1:tokens"].prompt.std().item()
    assert 0.3 < std < 0.7


def test_every_block_gets_gradients() -> None:
    bb = BACKBONES["hf_vit"]
    dm = unipeft.apply(bb.make(), "vpt_deep", num_tokens=2)
    bb.run(dm, bb.sample()).pow(2).sum().backward()
    grads = [p.grad for p in dm.deltas.parameters()]
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads)
