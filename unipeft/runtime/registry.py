"""Discovery: load the ``unipeft`` entry points, call their hooks, build the registry."""

from __future__ import annotations

import difflib
import importlib
import os
import re
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from ..contract import hookspecs
from ..contract.errors import PluginError
from ..contract.maps import StructureMap
from ..contract.method import Method
from ..maps.tiny import TinyBackbone
from .isolation import guard_method
from .targets import pick_map as _pick_map

BUILTIN_MODULE = "unipeft._builtin"
BUILTIN_DISTRIBUTION = "unipeft"
STRICT_ENV = "UNIPEFT_STRICT_PLUGINS"
SELECT_ENV = "UNIPEFT_LOAD_PLUGINS"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded, or whose hook raised.

    ``stage`` is where it failed: ``select`` (a distribution named in
    ``UNIPEFT_LOAD_PLUGINS`` is not installed), ``import``, ``register`` (pluggy refused
    the plugin), ``check_pending`` (a function marked ``@unipeft.hookimpl`` is not a
    unipeft hook) or the name of the hook that raised.
    """

    plugin: str
    distribution: str
    stage: str
    error: str
    traceback: str = field(repr=False, default="")


@dataclass
class Registry:
    """Every method, structure map and tiny backbone known, where each came from, and what
    failed."""

    methods: dict[str, Method] = field(default_factory=dict)
    method_sources: dict[str, str] = field(default_factory=dict)
    maps: list[StructureMap] = field(default_factory=list)
    map_sources: dict[str, str] = field(default_factory=dict)
    tiny_backbones: dict[str, TinyBackbone] = field(default_factory=dict)
    tiny_sources: dict[str, str] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)
    plugins: dict[str, str] = field(default_factory=dict)  # plugin name -> distribution
    manager: pluggy.PluginManager | None = None
    strict: bool = False

    def pick_map(self, model: Any) -> StructureMap:
        """The structure map for ``model``; a map that raises in ``matches`` is skipped
        and recorded as a failure of its plugin (an error in strict mode)."""
        return _pick_map(model, self.sorted_maps(), self.map_failed)

    def map_failed(self, smap: StructureMap, exc: BaseException, stage: str = "matches") -> None:
        """Record that ``smap`` raised in ``matches`` or ``sites`` (or returned the wrong
        type there); in strict mode, raise :class:`PluginError`. The caller skips the map."""
        name = getattr(smap, "name", repr(smap))
        source = self.map_sources.get(name, "<unknown>")
        dist, plugin = _source_parts(source)
        failure = PluginFailure(plugin, dist, f"{stage} ({name})", f"{type(exc).__name__}: {exc}")
        if self.strict:
            raise PluginError(
                f"structure map {name!r} from {source} raised in {stage}(): {failure.error} "
                f"({STRICT_ENV} is set)"
            ) from exc
        if failure not in self.failures:
            self.failures.append(failure)
            warnings.warn(
                f"structure map {name!r} from {source} raised in {stage}() and is skipped: "
                f"{failure.error}",
                RuntimeWarning,
                stacklevel=3,
            )

    def method_failed(self, method: Method, stage: str, exc: BaseException) -> PluginError:
        """Record that ``method`` raised (or returned the wrong type) in ``stage`` and return
        the :class:`PluginError` to raise, naming the method and its distribution. The call
        fails in any mode (the method was asked for); other methods are unaffected."""
        source = self.method_sources.get(method.id, method.distribution or "<unknown>")
        dist, plugin = _source_parts(source)
        error = f"{type(exc).__name__}: {exc}"
        failure = PluginFailure(plugin, dist, f"{stage} ({method.id})", error)
        if failure not in self.failures:
            self.failures.append(failure)
        return PluginError(
            f"method {method.id!r} from {source} failed in {stage}(): {error}. This is a "
            f"fault of the plugin, not of the call: report it to the maintainers of {dist}; "
            "other methods keep working"
        )

    def method(self, method_id: str) -> Method:
        if not isinstance(method_id, str):
            raise TypeError(
                f"a method id must be a string such as 'lora', got {type(method_id).__name__} "
                f"{method_id!r}"
            )
        try:
            return self.methods[method_id]
        except KeyError:
            raise PluginError(
                f"unknown method {method_id!r}.{_close(method_id, self.methods)} Registered "
                f"methods: {', '.join(sorted(self.methods)) or 'none'}. A method from a "
                "plugin appears once its distribution is installed."
            ) from None

    def tiny_backbone(self, name: str) -> TinyBackbone:
        """The registered tiny backbone ``name``; an error listing the known names if none."""
        if not isinstance(name, str):
            raise TypeError(f"a tiny backbone name must be a string, got {type(name).__name__}")
        try:
            return self.tiny_backbones[name]
        except KeyError:
            raise PluginError(
                f"unknown tiny backbone {name!r}.{_close(name, self.tiny_backbones)} Tiny "
                f"backbones: {', '.join(self.tiny_backbones) or 'none'}. A plugin adds "
                "its own with the register_tiny_backbones hook."
            ) from None

    def sorted_maps(self) -> list[StructureMap]:
        return sorted(self.maps, key=lambda m: -m.priority)


def _source_parts(source: str) -> tuple[str, str]:
    """``(distribution, plugin)`` from a source such as ``"dist (plugin 'name')"``."""
    found = re.fullmatch(r"(.*) \(plugin '(.*)'\)", source)
    return (found[1], found[2]) if found else (source, source)


def _close(name: str, known: Iterable[str], n: int = 3) -> str:
    close = difflib.get_close_matches(name, list(known), n=n)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


def _dist_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "<unknown>"


def _normalize(name: str) -> str:
    """A distribution name as packaging compares them: case and ``-_.`` runs ignored."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _selection(load_plugins: str | Iterable[str] | None) -> list[str] | None:
    """The distributions asked for, or ``None`` for all (the variable unset or empty)."""
    if load_plugins is None:
        load_plugins = os.environ.get(SELECT_ENV, "")
    if isinstance(load_plugins, str):
        load_plugins = load_plugins.split(",")
    names = [n.strip() for n in load_plugins if n.strip()]
    return names or None


def _select(
    entry_points: list[metadata.EntryPoint], wanted: list[str], reg: Registry
) -> list[metadata.EntryPoint]:
    """The entry points of the ``wanted`` distributions, and always the built-in one; a
    wanted name that is not installed is recorded as a failure."""
    installed = {_normalize(_dist_name(ep)): _dist_name(ep) for ep in entry_points}
    installed.pop(BUILTIN_DISTRIBUTION, None)
    keep = {_normalize(n) for n in wanted}
    for name in wanted:
        if _normalize(name) in installed or _normalize(name) == BUILTIN_DISTRIBUTION:
            continue
        others = ", ".join(sorted(installed.values())) or "none"
        reg.failures.append(
            PluginFailure(
                name,
                name,
                "select",
                f"{SELECT_ENV} names {name!r}, which is not an installed plugin distribution "
                f"(installed plugin distributions: {others}; unipeft's own always load)",
            )
        )
    return [
        ep
        for ep in entry_points
        if ep.value == BUILTIN_MODULE
        or _normalize(_dist_name(ep)) in (keep | {BUILTIN_DISTRIBUTION})
    ]


def _unknown_hooks(pm: pluggy.PluginManager, reg: Registry) -> None:
    """Record every hook implementation that no unipeft hook specifies.

    ``pm.check_pending()`` raises on the first one; each is reported here, so that a typo
    (``register_method``) is a failure of its plugin, which still keeps its other hooks.
    """
    try:
        pm.check_pending()
    except pluggy.PluginValidationError:
        pass
    else:
        return
    known = ", ".join(hookspecs.HOOKS)
    for name, caller in sorted(vars(pm.hook).items()):
        if name.startswith("_") or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.optionalhook:
                continue
            reg.failures.append(
                PluginFailure(
                    impl.plugin_name,
                    reg.plugins.get(impl.plugin_name, "<unknown>"),
                    "check_pending",
                    f"unknown hook {name!r}.{_close(name, hookspecs.HOOKS, n=1)} A function "
                    f"marked @unipeft.hookimpl must be named after a unipeft hook: {known}",
                )
            )


def _sinks(reg: Registry) -> dict[str, Callable[[str, str], Callable[[Any], None]]]:
    """For each hook, a factory of the ``register`` function one plugin's hook is given."""
    sources: dict[str, str] = {}  # method id -> "dist (plugin 'name')"

    def methods(plugin: str, dist: str) -> Callable[[Method], None]:
        def register(method: Method) -> None:
            if not isinstance(method, Method):
                raise TypeError(f"register() takes a unipeft.Method, got {type(method).__name__}")
            if method.id in reg.methods:
                raise PluginError(
                    f"method id {method.id!r} is registered twice: by {sources[method.id]} "
                    f"and by {dist} (plugin {plugin!r}). Uninstall one, or rename the method."
                )
            method = method.with_distribution(dist)
            if dist != BUILTIN_DISTRIBUTION:  # a plugin's callables run behind guards
                method = guard_method(method, reg.method_failed)
            reg.methods[method.id] = method
            sources[method.id] = reg.method_sources[method.id] = f"{dist} (plugin {plugin!r})"

        return register

    def maps(plugin: str, dist: str) -> Callable[[StructureMap], None]:
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

    def tiny(plugin: str, dist: str) -> Callable[[TinyBackbone], None]:
        def register(backbone: TinyBackbone) -> None:
            if not isinstance(backbone, TinyBackbone):
                raise TypeError(
                    "register() takes a unipeft.maps.tiny.TinyBackbone, got "
                    f"{type(backbone).__name__}"
                )
            if backbone.name in reg.tiny_sources:
                raise PluginError(
                    f"tiny backbone {backbone.name!r} is registered twice: by "
                    f"{reg.tiny_sources[backbone.name]} and by {dist} (plugin {plugin!r}). "
                    "Uninstall one, or rename the tiny backbone."
                )
            reg.tiny_backbones[backbone.name] = backbone
            reg.tiny_sources[backbone.name] = f"{dist} (plugin {plugin!r})"

        return register

    return {
        "register_methods": methods,
        "register_backbones": maps,
        "register_tiny_backbones": tiny,
    }


def build_registry(
    entry_points: Iterable[metadata.EntryPoint] | None = None,
    *,
    strict: bool | None = None,
    extra_plugins: Iterable[tuple[str, Any, str]] = (),
    load_plugins: str | Iterable[str] | None = None,
) -> Registry:
    """Load plugins and collect their registrations.

    ``entry_points`` defaults to the installed ``unipeft`` group; tests pass fakes.
    ``extra_plugins`` are ``(name, plugin object, distribution)`` registered directly.
    ``strict`` (default: ``UNIPEFT_STRICT_PLUGINS=1``) turns plugin failures into errors.
    ``load_plugins`` (default: ``UNIPEFT_LOAD_PLUGINS``, comma-separated) names the plugin
    distributions to load; unset or empty loads all. unipeft's own always load.
    """
    if strict is None:
        strict = _flag(STRICT_ENV)
    if entry_points is None:
        entry_points = metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP)
    reg = Registry(strict=strict)
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    reg.manager = pm

    entry_points = list(entry_points)
    wanted = _selection(load_plugins)
    if wanted is not None:
        entry_points = _select(entry_points, wanted, reg)
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
        loaded.append(("builtin", _builtin_module(), BUILTIN_DISTRIBUTION))

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
    _unknown_hooks(pm, reg)

    sinks = _sinks(reg)
    for hook_name in hookspecs.HOOKS:
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            dist = reg.plugins.get(impl.plugin_name, "<unknown>")
            kwargs = {"register": sinks[hook_name](impl.plugin_name, dist)}
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
        raise PluginError(f"plugins failed ({STRICT_ENV} is set):\n" + "\n".join(lines))
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
    marker = f"{hookspecs.PROJECT}_impl"
    if not any(hasattr(getattr(plugin, n, None), marker) for n in dir(plugin)):
        raise TypeError(
            f"plugin must be a module or an object with @unipeft.hookimpl functions "
            f"(register_methods, register_backbones...), got {type(plugin).__name__} "
            f"{plugin!r:.60}"
        )
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
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
