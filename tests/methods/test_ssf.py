"""SSF: the adapted timm ViT against the block maths written out (a scale and shift after
the patch embedding, the norms and every projection), merging (merged output == unmerged,
the folded weights are diag(γ) W and γ b + β, unmerge exact), several adapters, the paper's
init, refusals."""

from __future__ import annotations

import copy

import pytest
import torch

timm = pytest.importorskip("timm")

from _vision_ref import IMAGES, close, randomise, tiny_vit, vit_tokens  # noqa: E402

import unipeft  # noqa: E402
from unipeft.contract.errors import TargetError  # noqa: E402
from unipeft.testing.backbones import BACKBONES as TINY  # noqa: E402


def _affine(delta):
    g, b = delta.scale.detach(), delta.shift.detach()
    return lambda y: y * g + b


def _conv_affine(delta):
    g, b = delta.scale.detach(), delta.shift.detach()
    return lambda y: y * g.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def _hooks(adapter) -> dict:
    d = adapter.delta_at
    after = {"patch": _conv_affine(d("patch_embed.proj"))}
    for i in range(2):
        qkv = [d(f"blocks.{i}:attn.{r}") for r in "qkv"]
        g = torch.cat([q.scale.detach() for q in qkv])
        b = torch.cat([q.shift.detach() for q in qkv])
        after[(i, "qkv")] = lambda y, g=g, b=b: y * g + b
        after[(i, "norm1")] = _affine(d(f"blocks.{i}.norm1"))
        after[(i, "norm2")] = _affine(d(f"blocks.{i}.norm2"))
        after[(i, "proj")] = _affine(d(f"blocks.{i}:attn.out"))
        after[(i, "fc1")] = _affine(d(f"blocks.{i}:mlp.up"))
        after[(i, "fc2")] = _affine(d(f"blocks.{i}:mlp.down"))
    return after


def test_matches_reference_and_merges() -> None:
    vit = tiny_vit()
    base_out = vit_tokens(vit, IMAGES)
    model = unipeft.apply(copy.deepcopy(vit), "ssf")
    adapter = model.adapters["default"]
    # the paper's placement: patch embedding, both norms and every projection of each block
    assert len(adapter.sites) == 1 + 2 * 8
    assert model.num_trainable_parameters() == 2 * (32 + 2 * (32 * 3 + 32 + 32 + 128 + 32 + 32))
    randomise(model.deltas.parameters(), scale=0.3)
    with torch.no_grad():  # keep the scales near 1 so the output stays informative
        for name, p in model.deltas.named_parameters():
            if name.endswith("scale"):
                p.add_(1.0)
    want = vit_tokens(vit, IMAGES, after=_hooks(adapter))
    with torch.no_grad():
        got = model.base_model.forward_features(IMAGES)
    close(got, want, "ssf vs reference (timm ViT)", base=base_out)

    before = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    model.merge()
    with torch.no_grad():
        merged = model.base_model.forward_features(IMAGES)
    close(merged, got, "ssf merged vs unmerged")
    # the folded weights, written out: rows of qkv and LayerNorm scales
    sd = model.base_model.state_dict()
    d = adapter.delta_at
    g = torch.cat([d(f"blocks.0:attn.{r}").scale for r in "qkv"]).detach()
    b = torch.cat([d(f"blocks.0:attn.{r}").shift for r in "qkv"]).detach()
    torch.testing.assert_close(
        sd["blocks.0.attn.qkv.weight"], g[:, None] * before["blocks.0.attn.qkv.weight"]
    )
    torch.testing.assert_close(
        sd["blocks.0.attn.qkv.bias"], g * before["blocks.0.attn.qkv.bias"] + b
    )
    n = d("blocks.1.norm2")
    torch.testing.assert_close(
        sd["blocks.1.norm2.weight"], n.scale.detach() * before["blocks.1.norm2.weight"]
    )
    model.unmerge()
    for k, v in model.base_model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} not restored bit for bit by unmerge"


@pytest.mark.parametrize("name", ["bert", "gpt2", "open_clip", "llama"])
def test_text_and_fused_layouts_merge(name: str) -> None:
    """Linear, GPT-2 Conv1D (c_attn slices), nn.MultiheadAttention in_proj slices, Llama
    (no biases: the merge creates them while it lasts)."""
    bb = TINY[name]
    model = unipeft.apply(bb.make(), "ssf")
    randomise(model.deltas.parameters(), seed=2, scale=0.2)
    with torch.no_grad():
        out = bb.run(model, bb.sample(0))
        model.merge()
        merged = bb.run(model, bb.sample(0))
        model.unmerge()
        again = bb.run(model, bb.sample(0))
    close(merged, out, f"ssf merged vs unmerged ({name})")
    assert torch.equal(again, out)


def test_several_adapters_compose_and_merge() -> None:
    vit = tiny_vit()
    model = unipeft.apply(copy.deepcopy(vit), "ssf", targets=["mlp.up", "norm"])
    model.add_adapter("b", "ssf", targets=["mlp.up"])
    randomise(model.deltas.parameters(), seed=4, scale=0.3)
    model.set_active(["default", "b"])
    a, b = model.adapters["default"], model.adapters["b"]
    after = {}
    for i in range(2):
        fa, fb = (
            _affine(a.delta_at(f"blocks.{i}:mlp.up")),
            _affine(b.delta_at(f"blocks.{i}:mlp.up")),
        )
        after[(i, "fc1")] = lambda y, fa=fa, fb=fb: fb(fa(y))
        after[(i, "norm1")] = _affine(a.delta_at(f"blocks.{i}.norm1"))
        after[(i, "norm2")] = _affine(a.delta_at(f"blocks.{i}.norm2"))
    with torch.no_grad():
        got = model.base_model.forward_features(IMAGES)
    close(got, vit_tokens(vit, IMAGES, after=after), "two ssf adapters vs reference")
    model.merge()
    with torch.no_grad():
        merged = model.base_model.forward_features(IMAGES)
    close(merged, got, "two ssf adapters merged vs unmerged")


def test_paper_init_is_not_identity() -> None:
    model = unipeft.apply(tiny_vit(), "ssf", init="normal", init_std=0.05, targets=["mlp.up"])
    delta = model.adapters["default"].delta_at("blocks.0:mlp.up")
    assert 0.02 < delta.scale.std().item() < 0.1 and abs(delta.scale.mean().item() - 1) < 0.05
    assert delta.shift.abs().max().item() > 0
    assert not unipeft.get_method("ssf").is_identity_at_init(model.adapters["default"].config)


def test_refusals() -> None:
    with pytest.raises(TargetError, match=r"projection, a convolution or an affine norm"):
        unipeft.apply(tiny_vit(), "ssf", targets=["mlp"])  # a sublayer path: no weight
    with pytest.raises(TargetError, match=r"no bias"):
        unipeft.apply(TINY["llama"].make(), "ssf", targets=["norm"])  # RMSNorm: β cannot fold
    # the default targets skip what they cannot take (Llama's norms, BERT's embedding table)
    model = unipeft.apply(TINY["llama"].make(), "ssf")
    assert not any(s.role in ("norm", "embed") for s in model.adapters["default"].sites)
    with pytest.raises(unipeft.ConfigError, match="init_std"):
        unipeft.apply(tiny_vit(), "ssf", init_std=0.0)
