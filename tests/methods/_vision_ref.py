"""A plain-torch reference forward of the tiny timm ViT, with hooks where the vision methods
act (SSF, AdaptFormer, Convpass, RepAdapter have no PEFT equivalent: their tests compare
unipeft against the block maths written out here).

``vit_tokens(vit, images, **hooks)`` recomputes ``vit.forward_features(images)`` from the
model's weights with ``torch.nn.functional``; each hook is a dict keyed by layer index:

- ``after``: ``{"patch": f, (i, "norm1"): f, (i, "qkv"): f, (i, "proj"): f, (i, "norm2"): f,
  (i, "fc1"): f, (i, "fc2"): f}``: ``y -> f(y)`` on that operation's output;
- ``before``: ``{(i, "qkv"): f, (i, "fc1"): f}``: ``x -> f(x)`` on the projection's input;
- ``beside``: ``{(i, "attn"): f, (i, "mlp"): f}``: ``f(h)`` added to the sublayer's output,
  ``h`` its input (the normed tokens), before the residual sum.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Hook = Callable[[Tensor], Tensor]


def _tiny_vit(classes: int = 10) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
        depth=2, num_heads=2, num_classes=classes,
    ).eval()  # fmt: skip


def tiny_vit() -> nn.Module:
    """The tiny timm ViT of the tests (seed 0): 4x4 patches of 8 pixels, a class token."""
    return _tiny_vit()


IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _id(t: Tensor) -> Tensor:
    return t


def vit_tokens(
    vit: nn.Module,
    images: Tensor,
    *,
    after: dict | None = None,
    before: dict | None = None,
    beside: dict | None = None,
) -> Tensor:
    after, before, beside = after or {}, before or {}, beside or {}
    with torch.no_grad():
        pe = vit.patch_embed.proj
        x = F.conv2d(images, pe.weight, pe.bias, stride=pe.stride)
        x = after.get("patch", _id)(x)
        x = x.flatten(2).transpose(1, 2)
        cls = vit.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + vit.pos_embed
        for i, blk in enumerate(vit.blocks):
            x = x + _attention(blk, i, x, after, before, beside)
            x = x + _mlp(blk, i, x, after, before, beside)
        return F.layer_norm(x, x.shape[-1:], vit.norm.weight, vit.norm.bias, vit.norm.eps)


def _norm(ln: nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], ln.weight, ln.bias, ln.eps)


def _attention(blk, i, x, after, before, beside) -> Tensor:
    h = after.get((i, "norm1"), _id)(_norm(blk.norm1, x))
    attn = blk.attn
    b, n, c = h.shape
    qkv = F.linear(before.get((i, "qkv"), _id)(h), attn.qkv.weight, attn.qkv.bias)
    qkv = after.get((i, "qkv"), _id)(qkv)
    heads = attn.num_heads
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
    o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    o = after.get((i, "proj"), _id)(F.linear(o, attn.proj.weight, attn.proj.bias))
    if (i, "attn") in beside:
        o = o + beside[(i, "attn")](h)
    return o


def _mlp(blk, i, x, after, before, beside) -> Tensor:
    h = after.get((i, "norm2"), _id)(_norm(blk.norm2, x))
    mlp = blk.mlp
    u = F.linear(before.get((i, "fc1"), _id)(h), mlp.fc1.weight, mlp.fc1.bias)
    u = F.gelu(after.get((i, "fc1"), _id)(u))
    o = after.get((i, "fc2"), _id)(F.linear(u, mlp.fc2.weight, mlp.fc2.bias))
    if (i, "mlp") in beside:
        o = o + beside[(i, "mlp")](h)
    return o


def randomise(params, seed: int = 0, scale: float = 0.5) -> None:
    """Noise on every trainable tensor, so the adapter is far from the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def close(got: Tensor, want: Tensor, what: str, base: Tensor | None = None) -> float:
    """``got`` and ``want`` agree at float32 tolerance (1e-5 of the output's scale); with
    ``base``, also check that the adapter moved the output (nothing vacuous)."""
    assert got.shape == want.shape, f"{what}: {tuple(got.shape)} vs {tuple(want.shape)}"
    diff = (got - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    print(f"{what}: max |diff| = {diff:.3e} (output scale {scale:.3g})")
    if base is not None:
        moved = (want - base).abs().max().item()
        assert moved > 1e-3 * scale, f"{what}: the adapter is (nearly) the identity"
    assert diff <= 1e-5 * scale, f"{what}: {diff:.3e} > {1e-5 * scale:.3e}"
    return diff
