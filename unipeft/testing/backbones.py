"""The tiny random backbones the conformance kit runs on, read from the registry.

Every plugin's tiny backbones are here, under the names they registered with the
``register_tiny_backbones`` hook; unipeft's own (``bert``, ``gpt2``, ``llama``, ``hf_vit``,
``timm_vit``, ``open_clip``, ``videomae``) are registered the same way, from
:mod:`unipeft.maps.tiny`, where :class:`TinyBackbone` is defined.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from ..contract.errors import PluginError
from ..maps.tiny import TinyBackbone
from ..runtime.registry import registry

__all__ = ["BACKBONES", "TinyBackbone"]


class _Registered(Mapping[str, TinyBackbone]):
    """A read-only view of the registry's tiny backbones, read on every access, so that it
    follows ``unipeft.reset_registry()`` and plugins registered in the process."""

    def __getitem__(self, name: str) -> TinyBackbone:
        try:
            return registry().tiny_backbone(name)
        except PluginError as exc:  # a mapping says KeyError; the message lists the names
            raise KeyError(str(exc)) from None

    def __contains__(self, name: object) -> bool:
        return name in registry().tiny_backbones

    def __iter__(self) -> Iterator[str]:
        return iter(list(registry().tiny_backbones))

    def __len__(self) -> int:
        return len(registry().tiny_backbones)

    def __repr__(self) -> str:
        return f"BACKBONES({', '.join(self)})"


BACKBONES: Mapping[str, TinyBackbone] = _Registered()
"""Every registered tiny backbone, by name, in registration order. An unknown name raises
``KeyError`` with a message listing the known ones."""
