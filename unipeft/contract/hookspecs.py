"""The plugin contract: every hook unipeft calls, in one file.

A plugin is a module (or object) exposing functions marked with :data:`hookimpl`, made
known to unipeft through an entry point in the group ``unipeft``::

    [project.entry-points.unipeft]
    mymethod = "unipeft_mymethod"

unipeft's own methods, structure maps and tiny backbones are registered through this same
entry point (``builtin = "unipeft._builtin"``), so a plugin can do anything a built-in can.

When the registry is built, unipeft calls the hooks in the order they are defined here,
each on every plugin. A function marked :data:`hookimpl` whose name is not one of these
hooks (a typo such as ``register_method``) is reported as a plugin failure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from ..maps import StructureMap
    from ..maps.tiny import TinyBackbone
    from .method import Method

PROJECT = "unipeft"
ENTRY_POINT_GROUP = "unipeft"
HOOKS = ("register_methods", "register_backbones", "register_tiny_backbones")
"""Every hook, in the order unipeft calls them."""

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
"""Mark a plugin's implementation of a hook: ``@unipeft.hookimpl``."""


@hookspec
def register_methods(register: Callable[[Method], None]) -> None:
    """Register PEFT methods.

    Called once, when the registry is first built (the first call of
    :func:`unipeft.list_methods`, :func:`unipeft.apply`, :func:`unipeft.load`...). Call
    ``register(method)`` once per :class:`unipeft.Method`. A method id registered twice
    (by any two plugins) is an error that names both distributions. Returns nothing.
    """


@hookspec
def register_backbones(register: Callable[[StructureMap], None]) -> None:
    """Register structure maps, which turn a backbone into sites by semantic role.

    Called once, when the registry is first built. Call ``register(structure_map)`` with
    any object following :class:`unipeft.maps.StructureMap` (``name``, ``priority``,
    ``matches(model)``, ``sites(model)``); :class:`unipeft.maps.LayoutMap` describes most
    transformer families with data alone. When several maps match a backbone, the one with
    the highest ``priority`` is used (built-ins use 0 to 10, the generic map -1000).
    Returns nothing.
    """


@hookspec
def register_tiny_backbones(register: Callable[[TinyBackbone], None]) -> None:
    """Register tiny random models, so that tools can test methods on an architecture.

    Called once, when the registry is first built, after :func:`register_backbones`. Call
    ``register(tiny)`` once per :class:`unipeft.maps.tiny.TinyBackbone`: a seeded model
    built from a config (never downloaded), the inputs to run it on and the outputs to
    compare. A plugin that registers a structure map should register a tiny model that
    the map matches: the conformance kit runs on every registered tiny backbone
    (``pytest --unipeft-conformance ID --unipeft-backbones NAME`` picks some), and the CLI
    builds one from ``tiny:NAME``. A name registered twice (by any two plugins) is an error
    that names both distributions. Returns nothing.
    """
