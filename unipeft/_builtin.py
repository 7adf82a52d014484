"""unipeft's own methods and structure maps, registered like any plugin's."""

from __future__ import annotations

from collections.abc import Callable

from .hookspecs import hookimpl
from .maps.builtin import BUILTIN_MAPS
from .methods import bitfit, bottleneck_adapter, dora, lora, moe_lora, prompt_tuning, unipelt


@hookimpl
def register_methods(register: Callable) -> None:
    for module in (lora, dora, bottleneck_adapter, prompt_tuning, bitfit, unipelt, moe_lora):
        register(module.METHOD)


@hookimpl
def register_backbones(register: Callable) -> None:
    for smap in BUILTIN_MAPS:
        register(smap)
