"""Structure maps: from a backbone to its sites, by semantic role.

A map is any object with a ``name``, a ``priority``, ``matches(model)`` and ``sites(model)``
(the :class:`StructureMap` protocol). Most transformer families are described by data alone
with :class:`LayoutMap`: where the stack of blocks lives, and inside one block, the relative
path of each projection, sublayer and norm.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

from torch import nn

from .sites import ModuleSite, SequenceSite, Site, WeightRef

ROLES: tuple[str, ...] = (
    "embed",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.out",
    "mlp.up",
    "mlp.gate",
    "mlp.down",
    "norm",
    "block",
    "attn",
    "mlp",
    "tokens",
    "layer_tokens",
    # convolutional networks
    "stem",
    "conv.in",
    "conv.mid",
    "conv.out",
    "downsample",
    "stage",
    "head",
    # recurrent networks
    "rnn.ih",
    "rnn.hh",
    # state-space models
    "ssm.in",
    "ssm.x",
    "ssm.dt",
    "ssm.out",
    "ssm.conv",
    "mixer",
    # graph networks
    "gnn.lin",
    "gnn.mlp",
)
"""The semantic roles a structure map can expose. ``attn`` and ``mlp`` are whole sublayers
(input to output, before the residual sum); ``tokens`` is the token sequence of a whole
stack; ``layer_tokens`` is the token sequence of one block (soft tokens inserted at the
block's input and dropped from its output, for deep prompts such as VPT-Deep).

Beyond transformers (docs/backbones.md): ``stem`` (a ConvNet's first convolution),
``conv.in`` / ``conv.mid`` / ``conv.out`` (the convolutions of a residual block in order:
a bottleneck's 1x1 reduction, its spatial convolution, its 1x1 expansion), ``downsample``
(the shortcut projection of a block that changes resolution or width), ``stage`` (a whole
stage of blocks, input to output), ``head`` (the classifier); ``rnn.ih`` / ``rnn.hh`` (the
input and recurrent weights of one layer and direction of an ``nn.LSTM`` / ``nn.GRU``);
``ssm.in`` / ``ssm.x`` / ``ssm.dt`` / ``ssm.out`` / ``ssm.conv`` (a Mamba mixer's
projections and its depthwise convolution) and ``mixer`` (the whole mixer sublayer);
``gnn.lin`` (a graph convolution's node projection) and ``gnn.mlp`` (the projections of a
GIN layer's MLP)."""

_SLICE_NAMES = {3: ("q", "k", "v")}
_SUBLAYER_OUTPUT = {"attn": "attn.out", "mlp": "mlp.down"}


@runtime_checkable
class StructureMap(Protocol):
    """What ``register_backbones`` accepts.

    A map may also carry ``default_targets``, a mapping from a method id, a method family or
    a site kind (``"projection"``, ``"module"``, ``"sequence"``) to targets: what a method
    attaches to on this map's backbones when its own default targets (written for
    transformer blocks) reach nothing there. The first key that matches, in that order,
    wins; ``None`` there says the map has no default of its own for that method (its own
    default targets apply, and reaching nothing is an error naming the roles there).
    Targets a user passes are never replaced.
    """

    name: str
    priority: int

    def matches(self, model: nn.Module) -> bool: ...

    def sites(self, model: nn.Module) -> list[Site]: ...


def projection_site(
    *,
    name: str,
    path: str,
    module: nn.Module,
    role: str | None,
    layer: int | None,
    tower: str | None,
    part: tuple[int, int] | None = None,
    host_path: str | None = None,
    host: nn.Module | None = None,
) -> ModuleSite | None:
    """A site on a projection module, or ``None`` if ``module`` is not one unipeft knows.

    ``part=(i, n)`` selects the i-th of n equal slices of the output channels (fused qkv).
    """
    ref = weight_ref(module)
    if ref is None:
        return None
    out_slice = None
    channel_dim = 1 if ref.layout == "conv" else -1
    if part is not None:
        i, n = part
        step = ref.out_features // n
        out_slice = (i * step, (i + 1) * step)
    return ModuleSite(
        name=name,
        role=role,
        layer=layer,
        tower=tower,
        path=path,
        module=module,
        features=(out_slice[1] - out_slice[0]) if out_slice else ref.out_features,
        out_slice=out_slice,
        channel_dim=channel_dim,
        weight=ref,
        host_path=path if ref.layout == "mha_in" else host_path,
        host=module if ref.layout == "mha_in" else host,
    )


def weight_ref(module: nn.Module) -> WeightRef | None:
    """Describe a projection's weight, or ``None`` for modules that are not projections."""
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim:
            return None
        e = module.embed_dim
        return WeightRef("mha_in", "in_proj_weight", "in_proj_bias", e, 3 * e)
    if isinstance(module, nn.Linear):
        return WeightRef("linear", "weight", "bias", module.in_features, module.out_features)
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        if module.groups != 1 or (isinstance(module.padding, str) and module.padding != "valid"):
            return None
        if module.padding_mode != "zeros":  # a delta's convolution would pad with zeros
            return None
        args = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
        return WeightRef(
            "conv",
            "weight",
            "bias",
            module.in_channels,
            module.out_channels,
            tuple(module.kernel_size),
            args,
        )
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 Conv1D
        w = module.weight
        return WeightRef("conv1d_t", "weight", "bias", w.shape[0], w.shape[1])
    if is_pyg_linear(module):  # weight (out, in) as nn.Linear; lazy ones have no shape yet
        w = module.weight
        if isinstance(w, nn.parameter.UninitializedParameter) or w.dim() != 2:
            return None
        return WeightRef("linear", "weight", "bias", w.shape[1], w.shape[0])
    return None


def is_pyg_linear(module: nn.Module) -> bool:
    """Whether ``module`` is PyTorch Geometric's ``Linear`` (its graph layers' projection, an
    ``nn.Module`` computing ``F.linear``), told by class without importing the library."""
    cls = type(module)
    return (
        cls.__name__ == "Linear"
        and cls.__module__.startswith("torch_geometric.")
        and hasattr(module, "in_channels")
        and hasattr(module, "out_channels")
    )


def output_features(module: nn.Module) -> int:
    """Channels of a module's output where the module says so; 0 when unknown."""
    ref = weight_ref(module)
    if ref is not None and ref.layout != "mha_in":
        return ref.out_features
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim
    for attr in (
        "out_features",
        "embedding_dim",
        "num_features",
        "hidden_size",
        "embed_dim",
        "output_dim",
    ):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    weight = getattr(module, "weight", None)
    if weight is not None and getattr(weight, "ndim", 0) == 1:
        return int(weight.shape[0])
    return 0


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


@dataclass(frozen=True)
class BlockLayout:
    """Relative paths inside one transformer block.

    ``projections`` maps a role to a path, or to ``(path, i, n)`` for the i-th of n equal
    slices of a fused projection. ``sublayers`` maps ``attn`` / ``mlp`` to ``(entry, exit)``.
    """

    projections: Mapping[str, str | tuple[str, int, int]]
    sublayers: Mapping[str, tuple[str, str]]
    norms: tuple[str, ...] = ()

    def fits(self, block: nn.Module) -> bool:
        paths = [p if isinstance(p, str) else p[0] for p in self.projections.values()]
        paths += [p for pair in self.sublayers.values() for p in pair]
        return all(_get(block, p) is not None for p in paths)


@dataclass(frozen=True)
class Tower:
    """One stack of blocks. ``blocks`` is a regex; its group ``prefix`` is the path of the
    model that owns the stack (``""`` at the root, else ending in ``.``)."""

    blocks: str
    name: str | None = None
    embed: str | None = None
    sequence: Callable[[nn.Module, str, str | None], SequenceSite | None] | None = None
    requires: str | None = None
    """A module path, relative to the prefix, that must exist for a stack to be this tower
    (tells apart towers whose blocks sit at the same path, e.g. a bare image tower and a
    bare text tower)."""
    layer_tokens: bool = False
    """Whether each block also gets its own token sequence: a ``"container"``
    :class:`SequenceSite` named ``<block path>:tokens`` with role ``layer_tokens`` and the
    block's ``layer``, whose tokens enter the block's input at the same index (and batch
    layout) as the tower's ``sequence`` site and leave with its output. Only for blocks called
    with the sequence as first argument and at most an ``(L, L)`` ``attn_mask``."""


@dataclass(frozen=True)
class LayoutMap:
    """A structure map described by data: towers of blocks sharing one :class:`BlockLayout`."""

    name: str
    towers: tuple[Tower, ...]
    layout: BlockLayout
    priority: int = 0
    description: str = ""
    class_names: tuple[str, ...] = field(default=())
    """If given, the model or one of its submodules must have one of these class names."""

    def _stacks(self, model: nn.Module) -> Iterator[tuple[Tower, str, str, nn.Module]]:
        for path, module in model.named_modules():
            if not isinstance(module, nn.ModuleList | nn.Sequential) or len(module) == 0:
                continue
            for tower in self.towers:
                m = re.fullmatch(tower.blocks, path)
                if m and self.layout.fits(module[0]):
                    prefix = m.groupdict().get("prefix") or ""
                    if tower.requires and _get(model, prefix + tower.requires) is None:
                        continue
                    yield tower, path, prefix, module
                    break

    def matches(self, model: nn.Module) -> bool:
        if self.class_names:
            names = {type(m).__name__ for m in model.modules()}
            if not names.intersection(self.class_names):
                return False
        return next(self._stacks(model), None) is not None

    def sites(self, model: nn.Module) -> list[Site]:
        out: list[Site] = []
        for tower, stack_path, prefix, stack in self._stacks(model):
            if tower.embed:
                embed = _get(model, prefix + tower.embed)
                if embed is not None:
                    out.append(_module_site(model, prefix + tower.embed, "embed", None, tower.name))
            for layer, block in enumerate(stack):
                out.extend(self._block_sites(model, f"{stack_path}.{layer}", block, layer, tower))
            if tower.sequence is not None:
                seq = tower.sequence(model, prefix, tower.name)
                if seq is not None:
                    out.append(seq)
                    if tower.layer_tokens:
                        out.extend(_layer_token_sites(seq, stack_path, stack))
        return out

    def _block_sites(
        self, model: nn.Module, bpath: str, block: nn.Module, layer: int, tower: Tower
    ) -> list[Site]:
        out: list[Site] = []
        for role, spec in self.layout.projections.items():
            rel, part = (spec, None) if isinstance(spec, str) else (spec[0], spec[1:])
            module = block.get_submodule(rel)
            parent_rel = rel.rpartition(".")[0]
            parent = _get(block, parent_rel) if "." in rel else block
            host = parent if isinstance(parent, nn.MultiheadAttention) else None
            site = projection_site(
                name=f"{bpath}:{role}",
                path=f"{bpath}.{rel}",
                module=module,
                role=role,
                layer=layer,
                tower=tower.name,
                part=part,
                host_path=f"{bpath}.{parent_rel}" if host is not None else None,
                host=host,
            )
            if site is not None:
                out.append(site)
        widths = {s.role: s.features for s in out if s.out_slice is None}
        for role, (entry_rel, exit_rel) in self.layout.sublayers.items():
            exit_module = block.get_submodule(exit_rel)
            entry_module = block.get_submodule(entry_rel)
            # a sublayer's output has the width of its last projection
            width = widths.get(_SUBLAYER_OUTPUT.get(role, ""), 0) or output_features(exit_module)
            out.append(
                ModuleSite(
                    name=f"{bpath}:{role}",
                    role=role,
                    layer=layer,
                    tower=tower.name,
                    path=f"{bpath}.{exit_rel}",
                    module=exit_module,
                    features=width,
                    entry_path=f"{bpath}.{entry_rel}" if entry_rel != exit_rel else None,
                    entry=entry_module if entry_rel != exit_rel else None,
                )
            )
        for rel in self.layout.norms:
            if _get(block, rel) is not None:
                out.append(_module_site(model, f"{bpath}.{rel}", "norm", layer, tower.name))
        block_site = _module_site(model, bpath, "block", layer, tower.name)
        width = widths.get("attn.out", 0) or widths.get("mlp.down", 0) or block_site.features
        out.append(replace(block_site, name=f"{bpath}:block", features=width))
        return out


def _layer_token_sites(seq: SequenceSite, stack_path: str, stack: nn.Module) -> list[SequenceSite]:
    """One token sequence per block of a stack, laid out like the stack's own ``seq``."""
    # a container site sees the block's input as the stack passes it; only a container
    # tower site can be in another layout than batch first
    batch_first = seq.batch_first if seq.style == "container" else True
    return [
        SequenceSite(
            name=f"{stack_path}.{layer}:tokens",
            tower=seq.tower,
            features=seq.features,
            insert=block,
            strip=block,
            index=seq.index,
            style="container",
            batch_first=batch_first,
            role="layer_tokens",
            layer=layer,
        )
        for layer, block in enumerate(stack)
    ]


def _module_site(
    model: nn.Module, path: str, role: str | None, layer: int | None, tower: str | None
) -> ModuleSite:
    module = model.get_submodule(path)
    site = projection_site(name=path, path=path, module=module, role=role, layer=layer, tower=tower)
    if site is not None and site.weight is not None and site.weight.layout != "mha_in":
        return site
    return ModuleSite(
        name=path,
        role=role,
        layer=layer,
        tower=tower,
        path=path,
        module=module,
        features=output_features(module),
        channel_dim=1 if isinstance(module, nn.modules.conv._ConvNd) else -1,
    )


class GenericMap:
    """Any module by name: projections (Linear, Conv, GPT-2 Conv1D, the three slices of an
    ``nn.MultiheadAttention`` input projection) and plain modules (their output)."""

    name = "generic"
    priority = -1000
    description = "any module by name or regex; no roles"

    def matches(self, model: nn.Module) -> bool:
        return True

    def sites(self, model: nn.Module) -> list[Site]:
        return generic_sites(model)


def generic_sites(model: nn.Module) -> list[Site]:
    out: list[Site] = []
    for path, module in model.named_modules():
        if not path:
            continue
        if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
            for i, tag in enumerate(_SLICE_NAMES[3]):
                site = projection_site(
                    name=f"{path}[{tag}]",
                    path=path,
                    module=module,
                    role=None,
                    layer=None,
                    tower=None,
                    part=(i, 3),
                )
                if site is not None:
                    out.append(site)
            out.append(_module_site(model, path, None, None, None))
            continue
        parent_path = path.rpartition(".")[0]
        parent = _get(model, parent_path)
        if isinstance(parent, nn.MultiheadAttention) and path.endswith("out_proj"):
            site = projection_site(
                name=path,
                path=path,
                module=module,
                role=None,
                layer=None,
                tower=None,
                host_path=parent_path,
                host=parent,
            )
            if site is not None:
                out.append(site)
                continue
        out.append(_module_site(model, path, None, None, None))
    return out
