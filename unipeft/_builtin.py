"""unipeft's own methods and structure maps, registered like any plugin's."""

from __future__ import annotations

from collections.abc import Callable

from .contract.hookspecs import hookimpl
from .maps.builtin import BUILTIN_MAPS
from .methods import BUILTIN_METHODS


@hookimpl
def register_methods(register: Callable) -> None:
    for method in BUILTIN_METHODS:
        register(method)


@hookimpl
def register_backbones(register: Callable) -> None:
    for smap in BUILTIN_MAPS:
        register(smap)
