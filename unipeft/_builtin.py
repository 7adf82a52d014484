"""unipeft's own methods, structure maps and tiny backbones, registered like any plugin's."""

from __future__ import annotations

from collections.abc import Callable

from .contract.hookspecs import hookimpl
from .maps.builtin import BUILTIN_MAPS
from .maps.convnets import CONVNET_MAPS, CONVNET_TINY
from .maps.graph import GRAPH_MAPS, GRAPH_TINY
from .maps.recurrent import RECURRENT_MAPS, RECURRENT_TINY
from .maps.ssm import SSM_MAPS, SSM_TINY
from .maps.tiny import BUILTIN_TINY_BACKBONES
from .methods import BUILTIN_METHODS


@hookimpl
def register_methods(register: Callable) -> None:
    for method in BUILTIN_METHODS:
        register(method)


@hookimpl
def register_backbones(register: Callable) -> None:
    for smap in (*BUILTIN_MAPS, *CONVNET_MAPS, *SSM_MAPS, *GRAPH_MAPS, *RECURRENT_MAPS):
        register(smap)


@hookimpl
def register_tiny_backbones(register: Callable) -> None:
    for tiny in (*BUILTIN_TINY_BACKBONES, *CONVNET_TINY, *SSM_TINY, *GRAPH_TINY, *RECURRENT_TINY):
        register(tiny)
