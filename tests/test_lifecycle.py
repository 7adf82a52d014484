"""The foundation's promise end to end: LoRA on every tiny backbone (text, ViT, CLIP...)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _matrix import backbones

import unipeft
from unipeft.testing.backbones import BACKBONES


@pytest.mark.parametrize("name", backbones())
def test_apply_train_merge_save_load_unload(name: str, tmp_path: Path) -> None:
    bb = BACKBONES[name]
    backbone = bb.make()
    original = {k: v.clone() for k, v in backbone.state_dict().items()}
    ref = bb.make().requires_grad_(False)
    with torch.no_grad():
        base = bb.run(ref, bb.sample(0))

    model = unipeft.apply(backbone, "lora", r=4, targets=["attn.q", "attn.v"])
    with torch.no_grad():
        torch.testing.assert_close(bb.run(model, bb.sample(0)), base, atol=1e-5, rtol=1e-4)

    sites = model.adapters["default"].sites
    shapes = [tuple(site.weight_views()[0].shape) for site in sites]  # (out, in) each
    # r·(in + out) per site: 4·(32 + 32), but Llama's single key/value head gives v 16 outputs
    assert model.num_trainable_parameters() == sum(4 * (d_in + d_out) for d_out, d_in in shapes)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
    first = last = None
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(bb.run(model, bb.sample(0)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    assert last < first

    with torch.no_grad():
        trained = bb.run(model, bb.sample(0))
        model.merge()
        merged = bb.run(model, bb.sample(0))
        with pytest.warns(UserWarning, match="already merged"):
            model.merge()  # merging again is a no-op, not a double application
        torch.testing.assert_close(bb.run(model, bb.sample(0)), merged, atol=0, rtol=0)
        model.unmerge()
        assert torch.equal(bb.run(model, bb.sample(0)), trained)
    torch.testing.assert_close(merged, trained, atol=1e-5, rtol=1e-4)
    for k, v in original.items():
        assert torch.equal(backbone.state_dict()[k], v), k

    model.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "unipeft_adapters.json",
        "unipeft_adapters.safetensors",
    ]
    reloaded = unipeft.load(bb.make(), tmp_path)
    with torch.no_grad():
        assert torch.equal(bb.run(reloaded, bb.sample(0)), trained)

    back = model.unload()
    assert back is backbone
    assert back.state_dict().keys() == original.keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in original.items())
    assert all(p.requires_grad for p in back.parameters())


def test_handle_reaches_backbone_attributes() -> None:
    model = unipeft.apply(BACKBONES["open_clip"].make(), "lora", r=2)
    x = BACKBONES["open_clip"].sample(0)
    assert model.encode_image(x["pixels"]).shape == (2, 16)
    assert model.encode_text(x["text"]).shape == (2, 16)
    assert model.visual is model.base_model.visual


def test_several_adapters_and_switching() -> None:
    bb = BACKBONES["bert"]
    model = unipeft.apply(bb.make(), "lora", r=2)
    model.add_adapter("second", "bitfit")
    assert model.active_adapters == ("default",)
    for delta in model.deltas.parameters():
        torch.nn.init.normal_(delta, std=0.1)
    with torch.no_grad():
        first = bb.run(model, bb.sample(0))
        model.set_active("second")
        second = bb.run(model, bb.sample(0))
        model.set_active(["default", "second"])
        both = bb.run(model, bb.sample(0))
        model.set_active("default")
        assert torch.equal(bb.run(model, bb.sample(0)), first)
    assert not torch.allclose(first, second) and not torch.allclose(both, first)
    model.delete_adapter("second")
    assert "second" not in model.deltas and list(model.adapters) == ["default"]
    assert not any(k.startswith("deltas.second") for k in model.state_dict())


def test_moe_aux_loss_and_top_k() -> None:
    bb = BACKBONES["bert"]
    model = unipeft.apply(bb.make(), "moe_lora", num_experts=4, top_k=1, r=2)
    assert model.aux_loss() is None  # nothing ran yet
    bb.run(model, bb.sample(0))
    aux = model.aux_loss()
    assert aux is not None and aux.ndim == 0
    n_sites = len(model.adapters["default"].sites)
    # each site's balance loss is >= 1 with equality when perfectly balanced
    assert aux.item() >= n_sites * (1 - 1e-6)
    delta = next(iter(model.deltas["default"].values()))
    x = torch.randn(5, 32)
    gates, probs = delta.gates(x)
    assert ((gates > 0).sum(-1) == 1).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(5))
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
