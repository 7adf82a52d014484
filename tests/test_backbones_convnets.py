"""timm ConvNets (ResNet, ConvNeXt): their structure maps, the map's default targets, what
each family of methods does there, and the refusals that name the site kind."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from _matrix import role_sites
from torch import nn

import unipeft
from unipeft.contract.errors import TargetError
from unipeft.testing.backbones import BACKBONES

RESNET, CONVNEXT = BACKBONES["resnet"], BACKBONES["convnext"]


def test_resnet18_roles_follow_its_basic_blocks() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=4)
    roles = role_sites(model)
    assert roles["stem"] == ["conv1"]
    assert roles["head"] == ["fc"]
    assert roles["stage"] == ["layer1", "layer2", "layer3", "layer4"]
    # a basic block has two 3x3 convolutions: the first is conv.in, the second conv.out
    assert roles["conv.in"][:2] == ["layer1.0.conv1", "layer1.1.conv1"]
    assert roles["conv.out"][:2] == ["layer1.0.conv2", "layer1.1.conv2"]
    assert "conv.mid" not in roles
    # the shortcut projections of the blocks that change resolution
    assert roles["downsample"] == [f"layer{i}.0.downsample.0" for i in (2, 3, 4)]
    assert len(roles["block"]) == 8
    sites = {s.name: s for s in unipeft.inspect_sites(model)}
    assert sites["layer2"].features == 128 and sites["layer2"].channel_dim == 1
    assert sites["layer3.1:block"].features == 256


def test_bottleneck_and_convnextrole_sites() -> None:
    roles = role_sites(RESNET.make())
    assert roles["conv.mid"] == [f"layer{i}.0.conv2" for i in (1, 2, 3, 4)]
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=4)
    roles = role_sites(model)
    assert roles["mlp.up"][0] == "stages.0.blocks.0.mlp.fc1"
    assert roles["conv.mid"][0] == "stages.0.blocks.0.conv_dw"  # depthwise: not a projection
    assert roles["downsample"] == [f"stages.{i}.downsample.1" for i in (1, 2, 3)]
    assert roles["stem"] == ["stem.0"] and roles["head"] == ["head.fc"]
    sites = {s.name: s for s in unipeft.inspect_sites(model)}
    assert sites["stages.0.blocks.0.conv_dw"].weight is None
    assert sites["stages.0.blocks.0.conv_dw"].features == 40
    # convnext_atto's MLP is made of 1x1 convolutions: channels first all through
    assert sites["stages.0.blocks.0:mlp"].channel_dim == 1


def test_a_wrapped_trunk_is_found_under_its_prefix() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = RESNET.make()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.trunk(x)

    model = unipeft.apply(Wrapper(), "lora", r=2)
    names = [s.name for s in model.adapters["default"].sites]
    assert names[0] == "trunk.layer1.0.conv1" and len(names) == 12


def test_default_targets_come_from_the_map_when_the_methods_reach_nothing() -> None:
    model = unipeft.apply(RESNET.make(), "lora", r=2)
    assert model.adapters["default"].targets == ["conv.in", "conv.mid?", "conv.out"]
    assert {s.role for s in model.adapters["default"].sites} == {"conv.in", "conv.mid", "conv.out"}
    # targets a user names are never replaced
    with pytest.raises(TargetError, match=r"'attn.q' matches nothing on ResNet.*conv\.in"):
        unipeft.apply(RESNET.make(), "lora", r=2, targets=["attn.q"])
    # a method the map gives no default (None) keeps its own, and their error
    with pytest.raises(TargetError, match=r"match(es)? nothing"):
        unipeft.apply(RESNET.make(), "mam_adapter")
    # bitfit's own targets end in 'norm?', which reaches the batch norms' biases: kept
    bitfit = unipeft.apply(RESNET.make(), "bitfit")
    assert {s.role for s in bitfit.adapters["default"].sites} == {"norm"}
    assert bitfit.adapters["default"].targets[-1] == "norm?"


@pytest.mark.parametrize(
    ("method", "config"),
    [
        ("lora", {"r": 2}),
        ("dora", {"r": 2}),
        ("loha", {"r": 2}),
        ("lokr", {}),
        ("boft", {}),
        ("ia3", {}),
        ("bitfit", {}),
        ("ssf", {}),
    ],
)
@pytest.mark.parametrize("bb", [RESNET, CONVNEXT], ids=["resnet", "convnext"])
def test_mergeable_methods_train_and_merge_on_convnets(bb, method: str, config: dict) -> None:
    x = bb.sample(0)
    model = unipeft.apply(bb.make(), method, **config)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        loss = bb.run(model, x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        trained = bb.run(model, x)
        moved = (trained - bb.run(bb.make(), x)).abs().max()
        assert moved > 1e-4, f"training moved the outputs by {moved:.2e} only"
        model.merge()
        torch.testing.assert_close(bb.run(model, x), trained, atol=1e-5, rtol=1e-4)


def test_adapters_between_stages_save_and_load(tmp_path: Path) -> None:
    x = RESNET.sample(0)
    model = unipeft.apply(RESNET.make(), "bottleneck_adapter", bottleneck=4)
    assert [s.role for s in model.adapters["default"].sites] == ["stage"] * 4
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        out = RESNET.run(model, x)
    model.save(tmp_path)
    loaded = unipeft.load(RESNET.make(), tmp_path)
    with torch.no_grad():
        assert torch.equal(RESNET.run(loaded, x), out)


def test_convpass_runs_on_a_channels_last_convnext_mlp() -> None:
    x = CONVNEXT.sample(0)
    model = unipeft.apply(CONVNEXT.make(), "convpass", bottleneck=4)
    assert {s.role for s in model.adapters["default"].sites} == {"mlp"}
    with torch.no_grad():  # the up projection starts at zero: the backbone's outputs
        torch.testing.assert_close(
            CONVNEXT.run(model, x), CONVNEXT.run(CONVNEXT.make(), x), atol=1e-6, rtol=0
        )


@pytest.mark.parametrize(
    ("bb", "method", "targets", "message"),
    [
        (RESNET, "vera", None, r"'layer1.0.conv1' is a convolution|Linear-like projections"),
        (RESNET, "ln_tuning", None, "BatchNorm2d"),
        (RESNET, "moe_lora", None, "is a convolution"),
        (RESNET, "prompt_tuning", None, r"'tokens' matches nothing on ResNet.*stage"),
        (CONVNEXT, "lora", ["conv.mid"], "conv_dw"),
        (CONVNEXT, "convpass", ["stage"], "not a sublayer"),
    ],
)
def test_refusals_name_the_site_kind(bb, method: str, targets, message: str) -> None:
    backbone = bb.make()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(TargetError, match=message):
        unipeft.apply(backbone, method, targets=targets)
    after = backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not hasattr(backbone, "unipeft_adapters")
