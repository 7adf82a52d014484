"""Structure maps: roles per backbone, fused projections, MHA, selectors, the generic map."""

from __future__ import annotations

import pytest
import torch
from _matrix import TRANSFORMERS, backbones
from torch import nn

import unipeft
from unipeft import TargetError
from unipeft.maps import ROLES
from unipeft.testing.backbones import BACKBONES

# What is known of some backbones: the map that claims each, and the weight layout of its
# attn.q and attn.v (the DoRA tests count on these layouts). A backbone not listed here is
# tested all the same; it only has to be claimed by a map of its own, not the generic one.
KNOWN = {
    "bert": ("transformers-bert", "linear"),
    "gpt2": ("transformers-gpt2", "conv1d_t"),
    "llama": ("transformers-llama", "linear"),
    "hf_vit": ("transformers-vit", "linear"),
    "timm_vit": ("timm-vit", "linear"),
    "open_clip": ("open_clip", "mha_in"),
}
# only gated MLPs (Llama) have mlp.gate; only vision towers (and open_clip's text tower)
# have a token sequence per block (layer_tokens)
COMMON_ROLES = set(ROLES[: ROLES.index("layer_tokens")]) - {"mlp.gate"}


@pytest.mark.parametrize("name", backbones(family=TRANSFORMERS))
def test_every_backbone_exposes_the_common_roles(name: str) -> None:
    model = BACKBONES[name].make()
    roles = {s.role for s in unipeft.inspect_sites(model) if s.role}
    assert COMMON_ROLES <= roles, f"missing: {COMMON_ROLES - roles}"
    dm = unipeft.apply(model, "lora", r=2, targets=["attn.q", "attn.v"])
    assert dm.structure_map != "generic"
    n_layers = 2 * (2 if BACKBONES[name].family == "clip" else 1)  # CLIP: two towers of 2
    sites = dm.adapters["default"].sites
    assert sum(s.role == "attn.q" for s in sites) == n_layers
    assert sum(s.role == "attn.v" for s in sites) == n_layers
    if name in KNOWN:
        structure_map, layout = KNOWN[name]
        assert dm.structure_map == structure_map
        assert {s.weight.layout for s in sites} == {layout}


def test_llama_has_a_gate_projection() -> None:
    sites = unipeft.inspect_sites(BACKBONES["llama"].make())
    assert sum(s.role == "mlp.gate" for s in sites) == 2
    assert not any(s.role == "mlp.gate" for s in unipeft.inspect_sites(BACKBONES["bert"].make()))


def _capture(module: nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    module.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    return seen


def test_timm_fused_qkv_adapts_only_its_slice() -> None:
    bb = BACKBONES["timm_vit"]
    model = bb.make()
    qkv = model.blocks[0].attn.qkv
    x = bb.sample(0)["pixels"]
    dm = unipeft.apply(model, "lora", r=2, targets=["attn.v[0]"])
    with torch.no_grad():
        dm.deltas["default"]["blocks__0:attn__v"].B.normal_()
    seen = _capture(qkv)  # registered after unipeft's hook: sees the adapted output
    with torch.no_grad():
        with dm.disable():
            dm(x)
        dm(x)
    plain, adapted = seen
    d = qkv.in_features
    assert torch.equal(plain[..., : 2 * d], adapted[..., : 2 * d]), "q or k changed"
    assert not torch.allclose(plain[..., 2 * d :], adapted[..., 2 * d :]), "v did not change"


def test_gpt2_conv1d_slices_merge_into_the_right_columns() -> None:
    bb = BACKBONES["gpt2"]
    model = bb.make()
    w = model.h[0].attn.c_attn.weight  # Conv1D: (in, out)
    before = w.detach().clone()
    dm = unipeft.apply(model, "lora", r=2, targets=["attn.k[0]"])
    with torch.no_grad():
        dm.deltas["default"]["h__0:attn__k"].B.normal_()
    dm.merge()
    d = w.shape[0]
    changed = (w.detach() != before).any(dim=0)
    assert not changed[:d].any() and not changed[2 * d :].any() and changed[d : 2 * d].all()
    dm.unmerge()
    assert torch.equal(w.detach(), before)


def test_open_clip_mha_lora_never_touches_in_proj_weight_on_forward() -> None:
    bb = BACKBONES["open_clip"]
    model = bb.make()
    mha = model.visual.transformer.resblocks[0].attn
    w_before = mha.in_proj_weight.detach().clone()
    ptr = mha.in_proj_weight.data_ptr()
    dm = unipeft.apply(model, "lora", r=2, targets=["visual/attn.q[0]", "visual/attn.out[0]"])
    with torch.no_grad():
        for delta in dm.deltas["default"].values():
            delta.B.normal_()
    x = bb.sample(0)["pixels"]
    seen_w: list[torch.Tensor] = []
    mha.register_forward_pre_hook(lambda m, a: seen_w.append(m.in_proj_weight.detach().clone()))
    with torch.no_grad():
        out = dm.encode_image(x)
    assert torch.equal(seen_w[0], w_before) and mha.in_proj_weight.data_ptr() == ptr
    # the same function computed by merging, which changes the weights
    dm.merge()
    with torch.no_grad():
        merged = dm.encode_image(x)
    torch.testing.assert_close(out, merged, atol=1e-5, rtol=1e-4)
    dm.unmerge()
    assert torch.equal(mha.in_proj_weight.detach(), w_before)


def test_open_clip_mha_path_matches_pytorch_for_masks_and_weights() -> None:
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        holder = nn.Module()
        holder.attn = mha
        q = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
        kpm = torch.zeros(3, 5, dtype=torch.bool)
        kpm[1, 3:] = True
        causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
        with torch.no_grad():
            ref_out, ref_w = mha(q, q, q, key_padding_mask=kpm, attn_mask=causal)
            dm = unipeft.apply(holder, "lora", r=2, targets=["attn\\[q\\]"])
            out, w = dm.attn(q, q, q, key_padding_mask=kpm, attn_mask=causal)
            out2, _ = dm.attn(q, q, q, key_padding_mask=kpm, attn_mask=causal, need_weights=False)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out2, ref_out, atol=1e-5, rtol=1e-4)
        dm.unload()


def test_layer_selectors_and_towers() -> None:
    model = BACKBONES["open_clip"].make()
    dm = unipeft.apply(model, "lora", r=2, targets=["text/attn.v[-1]", "visual/mlp.up[0:1]"])
    names = sorted(s.name for s in dm.adapters["default"].sites)
    assert names == ["transformer.resblocks.1:attn.v", "visual.transformer.resblocks.0:mlp.up"]
    dm.unload()
    with pytest.raises(TargetError, match="out of range"):
        unipeft.apply(model, "lora", targets=["attn.q[7]"])
    with pytest.raises(TargetError, match=r"slice like \[0:4\]"):
        unipeft.apply(model, "lora", targets=["attn.q[a]"])


def test_regex_targets_reach_modules_by_name() -> None:
    model = BACKBONES["bert"].make()
    dm = unipeft.apply(model, "lora", r=2, targets=["re:encoder\\.layer\\.1\\..*\\.dense"])
    names = sorted(s.name for s in dm.adapters["default"].sites)
    assert names == [
        "encoder.layer.1.attention.output.dense",
        "encoder.layer.1.intermediate.dense",
        "encoder.layer.1.output.dense",
    ]


class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_generic_map_on_an_unknown_model() -> None:
    model = _Plain().eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        base = model(x)
    with pytest.raises(TargetError, match="generic map") as info:
        unipeft.apply(model, "lora", targets=["attn.q"])
    assert "re:" in str(info.value)
    dm = unipeft.apply(model, "lora", r=2, targets=["conv", "fc"])
    with torch.no_grad():
        assert torch.equal(dm(x), base)
        for delta in dm.deltas["default"].values():
            delta.B.normal_()
        unmerged = dm(x)
    dm.merge()
    with torch.no_grad():
        torch.testing.assert_close(dm(x), unmerged, atol=1e-5, rtol=1e-4)
    dm.unmerge()
    assert dm.num_trainable_parameters() == 2 * (3 * 9 + 8) + 2 * (8 + 4)


def test_unknown_role_lists_what_the_backbone_has() -> None:
    model = BACKBONES["bert"].make()
    with pytest.raises(TargetError) as info:
        unipeft.apply(model, "lora", targets=["mlp.gate"])
    msg = str(info.value)
    assert "'mlp.gate'" in msg and "attn.q (x2)" in msg and "transformers-bert" in msg


def test_open_clip_towers_passed_alone_keep_their_names() -> None:
    """``clip.visual`` alone is the image tower (prompts after the class token); the text
    transformer alone is still the text tower."""
    clip = BACKBONES["open_clip"].make()
    visual_sites = unipeft.inspect_sites(clip.visual)
    assert {s.tower for s in visual_sites if s.role} == {"visual"}  # role sites, not by name
    tokens = [s for s in visual_sites if s.role == "tokens"]
    assert len(tokens) == 1 and tokens[0].index == 1
    per_layer = [s for s in visual_sites if s.role == "layer_tokens"]
    assert [(s.layer, s.index) for s in per_layer] == [(0, 1), (1, 1)]
    assert any(s.role == "embed" and s.path == "conv1" for s in visual_sites)
    dm = unipeft.apply(clip.visual, "lora", r=2, targets=["visual/attn.q"])
    assert len(dm.adapters["default"].sites) == 2  # one per block of the image tower
    full = {s.tower for s in unipeft.inspect_sites(BACKBONES["open_clip"].make()) if s.role}
    assert full == {"visual", "text"}  # the whole model maps as before
    prompts = unipeft.apply(BACKBONES["open_clip"].make().visual, "prompt_tuning", num_tokens=2)
    pixels = BACKBONES["open_clip"].sample()["pixels"]
    with torch.no_grad():
        assert prompts(pixels).shape == (2, 16)
