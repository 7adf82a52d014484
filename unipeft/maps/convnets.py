"""Structure maps for convolutional networks: timm's ResNet and ConvNeXt families.

A ConvNet has no attention and no token sequence; its roles (docs/backbones.md) are the
stem, the convolutions of each residual block in order (``conv.in``, ``conv.mid``,
``conv.out``), the shortcut projections that change resolution (``downsample``), the norms,
each block and each stage as a whole (for adapters between them), and the classifier
(``head``). ConvNeXt's pointwise MLP keeps the transformer roles ``mlp.up`` / ``mlp.down``
(and its sublayer ``mlp``), which it is.

Layers count blocks across the whole network (``conv.mid[0:2]``: the first two blocks);
``stage`` sites count stages. The maps find the network anywhere inside the model (a
classifier wrapping a timm trunk, say), by the class and module timm defines it in.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from ..contract.maps import output_features, projection_site
from ..contract.sites import ModuleSite, Site
from .tiny import TinyBackbone


def _find(model: nn.Module, module_name: str, class_name: str) -> Iterator[tuple[str, nn.Module]]:
    for path, module in model.named_modules():
        cls = type(module)
        if cls.__name__ == class_name and cls.__module__ == module_name:
            yield path, module


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}.{rel}" if prefix and rel else prefix or rel


def _channels(module: nn.Module) -> int:
    """The channels a block or stage puts out: those of its last convolution or linear."""
    last = 0
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            last = m.out_channels
        elif isinstance(m, nn.Linear):
            last = m.out_features
    return last


def _module_site(
    path: str, module: nn.Module, role: str, layer: int | None, channel_dim: int = 1
) -> ModuleSite:
    """A site on a module's output (a block, a stage, a norm, a depthwise convolution)."""
    return ModuleSite(
        name=path if role != "block" else f"{path}:block",
        role=role,
        layer=layer,
        tower=None,
        path=path,
        module=module,
        features=output_features(module) or _channels(module),
        channel_dim=channel_dim,
    )


def _projection(path: str, module: nn.Module, role: str, layer: int | None) -> Site | None:
    """A projection site (a dense convolution or a linear layer), else a plain module site
    (a depthwise convolution: its weight has one input channel per group)."""
    site = projection_site(name=path, path=path, module=module, role=role, layer=layer, tower=None)
    if site is not None:
        return site
    return _module_site(path, module, role, layer, 1 if isinstance(module, nn.Conv2d) else -1)


def _convs(module: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(p, m) for p, m in module.named_modules() if isinstance(m, nn.Conv2d)]


class ResNetMap:
    """timm's ResNet family (``resnet*``, ``resnext*``, ``wide_resnet*``, ``seresnet*``...):
    ``conv1`` / ``conv2`` / ``conv3`` of each basic or bottleneck block, the shortcut's
    projection, the batch norms, blocks, stages ``layer1..4`` and ``fc``."""

    name = "timm-resnet"
    priority = 0
    description = "timm ResNet / ResNeXt (basic and bottleneck blocks)"
    default_targets = MappingProxyType(
        {
            "projection": ("conv.in", "conv.mid?", "conv.out"),
            "bitfit": ("norm", "head"),
            "ln_tuning": ("norm",),
            "ssf": ("norm",),
            # a parallel adapter reads the site's input, and a stage widens its input
            "mam_adapter": None,
            "module": ("stage",),
        }
    )

    def matches(self, model: nn.Module) -> bool:
        return next(_find(model, "timm.models.resnet", "ResNet"), None) is not None

    def sites(self, model: nn.Module) -> list[Site]:
        out: list[Site] = []
        for prefix, net in _find(model, "timm.models.resnet", "ResNet"):
            out.extend(self._network(prefix, net))
        return out

    def _network(self, prefix: str, net: nn.Module) -> list[Site]:
        out: list[Site] = []
        for rel, conv in _convs(net.conv1) or [("", net.conv1)]:
            site = _projection(_join(_join(prefix, "conv1"), rel), conv, "stem", None)
            if site is not None:
                out.append(site)
        if isinstance(getattr(net, "bn1", None), nn.BatchNorm2d):
            out.append(_module_site(_join(prefix, "bn1"), net.bn1, "norm", None))
        block_index = 0
        for stage_index in range(1, 5):
            stage = getattr(net, f"layer{stage_index}", None)
            if not isinstance(stage, nn.Sequential):
                continue
            stage_path = _join(prefix, f"layer{stage_index}")
            for j, block in enumerate(stage):
                out.extend(_resnet_block(f"{stage_path}.{j}", block, block_index))
                block_index += 1
            out.append(_module_site(stage_path, stage, "stage", stage_index - 1))
        fc = getattr(net, "fc", None)
        if isinstance(fc, nn.Linear):
            site = _projection(_join(prefix, "fc"), fc, "head", None)
            if site is not None:
                out.append(site)
        return out


def _resnet_block(path: str, block: nn.Module, layer: int) -> list[Site]:
    convs = [
        n for n in ("conv1", "conv2", "conv3") if isinstance(getattr(block, n, None), nn.Conv2d)
    ]
    roles = ("conv.in", "conv.mid", "conv.out") if len(convs) == 3 else ("conv.in", "conv.out")
    out: list[Site] = []
    for name, role in zip(convs, roles, strict=False):
        site = _projection(f"{path}.{name}", getattr(block, name), role, layer)
        if site is not None:
            out.append(site)
    for name in ("bn1", "bn2", "bn3"):
        norm = getattr(block, name, None)
        if isinstance(norm, nn.BatchNorm2d):
            out.append(_module_site(f"{path}.{name}", norm, "norm", layer))
    down = getattr(block, "downsample", None)
    if isinstance(down, nn.Sequential):
        for rel, conv in _convs(down):
            site = _projection(f"{path}.downsample.{rel}", conv, "downsample", layer)
            if site is not None:
                out.append(site)
    out.append(_module_site(path, block, "block", layer))
    return out


class ConvNeXtMap:
    """timm's ConvNeXt family: the patchify stem, each stage's downsampling convolution, each
    block's depthwise convolution, norm and pointwise MLP (``mlp.up`` / ``mlp.down``, linear
    or 1x1 convolutions), blocks, stages and the head's classifier."""

    name = "timm-convnext"
    priority = 0
    description = "timm ConvNeXt (depthwise convolution + pointwise MLP blocks)"
    default_targets = MappingProxyType(
        {
            "projection": ("mlp.up", "mlp.down"),
            "bitfit": ("norm", "mlp.up", "mlp.down", "head"),
            "ln_tuning": ("norm",),
            "ssf": ("norm",),
            "module": ("stage",),
            "adaptformer": ("mlp",),
            # X-LoRA's classifier reads one hidden width, and the stages widen
            "xlora": None,
        }
    )

    def matches(self, model: nn.Module) -> bool:
        return next(_find(model, "timm.models.convnext", "ConvNeXt"), None) is not None

    def sites(self, model: nn.Module) -> list[Site]:
        out: list[Site] = []
        for prefix, net in _find(model, "timm.models.convnext", "ConvNeXt"):
            out.extend(self._network(prefix, net))
        return out

    def _network(self, prefix: str, net: nn.Module) -> list[Site]:
        out: list[Site] = []
        stem_path = _join(prefix, "stem")
        for rel, conv in _convs(net.stem):
            site = _projection(_join(stem_path, rel), conv, "stem", None)
            if site is not None:
                out.append(site)
        block_index = 0
        for i, stage in enumerate(net.stages):
            stage_path = _join(prefix, f"stages.{i}")
            for rel, conv in _convs(stage.downsample):
                site = _projection(f"{stage_path}.downsample.{rel}", conv, "downsample", None)
                if site is not None:
                    out.append(site)
            for j, block in enumerate(stage.blocks):
                out.extend(_convnext_block(f"{stage_path}.blocks.{j}", block, block_index))
                block_index += 1
            out.append(_module_site(stage_path, stage, "stage", i))
        head = getattr(net, "head", None)
        fc = getattr(head, "fc", None)
        if isinstance(fc, nn.Linear):
            site = _projection(_join(prefix, "head.fc"), fc, "head", None)
            if site is not None:
                out.append(site)
        norm = getattr(head, "norm", None)
        if norm is not None and not isinstance(norm, nn.Identity):
            out.append(_module_site(_join(prefix, "head.norm"), norm, "norm", None))
        return out


def _convnext_block(path: str, block: nn.Module, layer: int) -> list[Site]:
    out: list[Site] = []
    out.append(_module_site(f"{path}.conv_dw", block.conv_dw, "conv.mid", layer))
    # conv_mlp blocks keep (N, C, H, W) through the MLP; the others permute to channels last
    conv_mlp = isinstance(block.mlp.fc1, nn.Conv2d)
    channel_dim = 1 if conv_mlp else -1
    norm = block.norm
    out.append(_module_site(f"{path}.norm", norm, "norm", layer, channel_dim))
    for name, role in (("fc1", "mlp.up"), ("fc2", "mlp.down")):
        site = _projection(f"{path}.mlp.{name}", getattr(block.mlp, name), role, layer)
        if site is not None:
            out.append(site)
    out.append(
        ModuleSite(
            name=f"{path}:mlp",
            role="mlp",
            layer=layer,
            tower=None,
            path=f"{path}.mlp",
            module=block.mlp,
            features=output_features(block.mlp.fc2),
            channel_dim=channel_dim,
        )
    )
    out.append(_module_site(path, block, "block", layer))
    return out


CONVNET_MAPS = (ResNetMap(), ConvNeXtMap())


# ------------------------------------------------------------------ tiny backbones


def _tiny_resnet() -> nn.Module:
    from timm.models.resnet import Bottleneck, ResNet

    # zero_init_last would zero each block's last norm: a random tiny ResNet whose residual
    # branches are all off gives its convolutions no gradient
    return ResNet(
        block=Bottleneck,
        layers=(1, 1, 1, 1),
        channels=(4, 4, 8, 8),
        stem_width=8,
        num_classes=3,
        zero_init_last=False,
    )


def _tiny_convnext() -> nn.Module:
    from timm.models.convnext import ConvNeXt

    # layer scale at 0.1, near a trained ConvNeXt's (timm's 1e-6 would mute every block)
    return ConvNeXt(
        depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=3, patch_size=2, ls_init_value=0.1
    )


def _images(gen: torch.Generator) -> dict[str, Any]:
    return {"pixels": torch.randn(2, 3, 32, 32, generator=gen)}


def _features_and_logits(model: nn.Module, inputs: dict[str, Any]) -> list[Tensor]:
    features = model.forward_features(inputs["pixels"])
    # the pooled features (ConvNeXt: normalised), as a classifier reads them, and the logits
    return [model.forward_head(features, pre_logits=True), model.forward_head(features)]


CONVNET_TINY = (
    TinyBackbone("resnet", "convnet", _tiny_resnet, _images, _features_and_logits),
    TinyBackbone("convnext", "convnet", _tiny_convnext, _images, _features_and_logits),
)
