"""Structure maps: how unipeft finds semantic roles (``attn.q``, ``mlp.down``...) in a backbone."""

from ..contract.maps import (
    ROLES,
    BlockLayout,
    GenericMap,
    LayoutMap,
    StructureMap,
    Tower,
    generic_sites,
)
from .builtin import BUILTIN_MAPS
from .tiny import BUILTIN_TINY_BACKBONES, TinyBackbone

__all__ = [
    "BUILTIN_MAPS",
    "BUILTIN_TINY_BACKBONES",
    "ROLES",
    "BlockLayout",
    "GenericMap",
    "LayoutMap",
    "StructureMap",
    "TinyBackbone",
    "Tower",
    "generic_sites",
]
