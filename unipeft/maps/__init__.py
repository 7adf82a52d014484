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

__all__ = [
    "BUILTIN_MAPS",
    "ROLES",
    "BlockLayout",
    "GenericMap",
    "LayoutMap",
    "StructureMap",
    "Tower",
    "generic_sites",
]
