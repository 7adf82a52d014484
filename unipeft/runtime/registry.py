"""Discovery: load the ``unipeft`` entry points, call their hooks, build the registry."""

from __future__ import annotations

import importlib
import os
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from ..contract import hookspecs
from ..contract.errors import PluginError
from ..contract.maps import StructureMap
from ..contract.method import Method

BUILTIN_MODULE = "unipeft._builtin"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded, or whose hook raised."""

    plugin: str
    distribution: str
    stage: str
    error: str
    traceback: str = field(repr=False, default="")


@dataclass
class Registry:
    """Every method and structure map known, where each came from, and what failed."""

    methods: dict[str, Method] = field(default_factory=dict)
    maps: list[StructureMap] = field(default_factory=list)
    map_sources: dict[str, str] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)
    plugins: dict[str, str] = field(default_factory=dict)  # plugin name -> distribution
    manager: pluggy.PluginManager | None = None

    def method(self, method_id: str) -> Method:
        try:
            return self.methods[method_id]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(method_id, list(self.methods), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            known = ", ".join(sorted(self.methods)) or "none"
            raise PluginError(
                f"unknown method {method_id!r}.{hint} Registered methods: {known}. "
                "A method from a plugin appears once its distribution is installed."
            ) from None

    def sorted_maps(self) -> list[StructureMap]:
        return sorted(self.maps, key=lambda m: -m.priority)


def _dist_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "<unknown>"


def build_registry(
    entry_points: Iterable[metadata.EntryPoint] | None = None,
    *,
    strict: bool | None = None,
    extra_plugins: Iterable[tuple[str, Any, str]] = (),
) -> Registry:
    """Load plugins and collect their registrations.

    ``entry_points`` defaults to the installed ``unipeft`` group; tests pass fakes.
    ``extra_plugins`` are ``(name, plugin object, distribution)`` registered directly.
    ``strict`` (default: ``UNIPEFT_STRICT_PLUGINS=1``) turns plugin failures into errors.
    """
    if strict is None:
        strict = os.environ.get("UNIPEFT_STRICT_PLUGINS", "") not in ("", "0", "false")
    if entry_points is None:
        entry_points = metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP)
    reg = Registry()
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    reg.manager = pm

    loaded: list[tuple[str, Any, str]] = []
    for ep in entry_points:
        dist = _dist_name(ep)
        try:
            loaded.append((ep.name, ep.load(), dist))
        except Exception as exc:  # a broken plugin must not take the others down
            reg.failures.append(
                PluginFailure(
                    ep.name, dist, "import", f"{type(exc).__name__}: {exc}", traceback.format_exc()
                )
            )
    loaded.extend(extra_plugins)
    if not any(obj is _builtin_module() for _, obj, _ in loaded):
        # running from a source tree that was never installed: no entry point metadata
        loaded.append(("builtin", _builtin_module(), "unipeft"))

    for name, obj, dist in loaded:
        if pm.is_registered(obj) or pm.get_plugin(name) is not None:
            continue
        try:
            pm.register(obj, name=name)
        except Exception as exc:
            reg.failures.append(
                PluginFailure(name, dist, "register", f"{type(exc).__name__}: {exc}")
            )
            continue
        reg.plugins[name] = dist

    method_src: dict[str, str] = {}

    def method_sink(plugin: str, dist: str):
        def register(method: Method) -> None:
            if not isinstance(method, Method):
                raise TypeError(f"register() takes a unipeft.Method, got {type(method).__name__}")
            if method.id in reg.methods:
                raise PluginError(
                    f"method id {method.id!r} is registered twice: by {method_src[method.id]} "
                    f"and by {dist} (plugin {plugin!r}). Uninstall one, or rename the method."
                )
            reg.methods[method.id] = method.with_distribution(dist)
            method_src[method.id] = f"{dist} (plugin {plugin!r})"

        return register

    def map_sink(plugin: str, dist: str):
        def register(smap: StructureMap) -> None:
            if not isinstance(smap, StructureMap):
                raise TypeError(
                    f"register() takes a structure map (name, priority, matches, sites), "
                    f"got {type(smap).__name__}"
                )
            if smap.name in reg.map_sources:
                raise PluginError(
                    f"structure map {smap.name!r} is registered twice: by "
                    f"{reg.map_sources[smap.name]} and by {dist} (plugin {plugin!r})"
                )
            reg.maps.append(smap)
            reg.map_sources[smap.name] = f"{dist} (plugin {plugin!r})"

        return register

    for hook_name, sink in (("register_methods", method_sink), ("register_backbones", map_sink)):
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            dist = reg.plugins.get(impl.plugin_name, "<unknown>")
            kwargs = {"register": sink(impl.plugin_name, dist)}
            try:
                impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
            except PluginError:
                raise
            except Exception as exc:
                reg.failures.append(
                    PluginFailure(
                        impl.plugin_name,
                        dist,
                        hook_name,
                        f"{type(exc).__name__}: {exc}",
                        traceback.format_exc(),
                    )
                )
    if strict and reg.failures:
        lines = [f"  - {f.plugin} ({f.distribution}) at {f.stage}: {f.error}" for f in reg.failures]
        raise PluginError("plugins failed (UNIPEFT_STRICT_PLUGINS is set):\n" + "\n".join(lines))
    return reg


def _builtin_module() -> Any:
    return importlib.import_module(BUILTIN_MODULE)


_REGISTRY: Registry | None = None
_IN_PROCESS: list[tuple[str, Any, str]] = []


def register_plugin(plugin: Any, name: str | None = None) -> None:
    """Register a plugin object (module or instance with hookimpls) without installing it.

    For notebooks and tests; installed distributions use the ``unipeft`` entry point. The
    registry is rebuilt on next use, so errors (e.g. a duplicate method id) surface then.
    """
    name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
    if any(n == name for n, _, _ in _IN_PROCESS):
        raise PluginError(f"a plugin named {name!r} is already registered in this process")
    _IN_PROCESS.append((name, plugin, "<in-process>"))
    reset_registry()


def registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_registry(extra_plugins=list(_IN_PROCESS))
        for failure in _REGISTRY.failures:
            import warnings

            warnings.warn(
                f"unipeft plugin {failure.plugin!r} from {failure.distribution} failed at "
                f"{failure.stage}: {failure.error}",
                RuntimeWarning,
                stacklevel=2,
            )
    return _REGISTRY


def reset_registry() -> None:
    """Forget the registry so the next use reloads the plugins (tests, notebooks)."""
    global _REGISTRY
    _REGISTRY = None
