"""unipeft: parameter-efficient fine-tuning across modalities, one delta-module abstraction.

The public API::

    model = unipeft.apply(backbone, "lora", r=4, targets=["attn.q", "attn.v"])
    model.save("out/")
    model = unipeft.load(fresh_backbone, "out/")
    unipeft.list_methods()
"""

from __future__ import annotations

import sys
from typing import Any

import pluggy
from torch import nn

from . import compose, contract
from ._version import __version__
from .contract.config import DeltaConfig
from .contract.deltas import (
    AdditiveDelta,
    DeltaModule,
    Gate,
    HybridDelta,
    MixtureOfExpertsDelta,
    ProjectionShape,
    ReparameterizedDelta,
    ScalarGate,
    SelectiveDelta,
)
from .contract.errors import (
    AdapterError,
    ConfigError,
    LoadError,
    MergeError,
    PluginError,
    TargetError,
    UnipeftError,
)
from .contract.hookspecs import hookimpl
from .contract.method import Method
from .contract.plan import AdapterPlan
from .contract.sites import ModuleSite, SequenceSite, Site
from .features import arithmetic, budget, interop
from .features.budget import BudgetPlan, plan_budget
from .features.optim import param_groups
from .model import Adapter, DeltaModel
from .runtime.checks import Targets
from .runtime.registry import PluginFailure, Registry, register_plugin, registry, reset_registry
from .runtime.targets import all_sites, pick_map, resolve_targets  # noqa: F401 (0.1 names)

# Module paths of unipeft 0.1, kept as aliases of the modules' homes since the renovation
# (docs/architecture.md has the tree): ``from unipeft.delta import DeltaModule`` still works.
_LEGACY_PATHS = {
    "arithmetic": arithmetic,
    "budget": budget,
    "config": contract.config,
    "delta": contract.deltas,
    "errors": contract.errors,
    "hookspecs": contract.hookspecs,
    "interop": interop,
    "interop.peft": interop.peft,
    "registry": contract.method,
    "sites": contract.sites,
}
for _old, _module in _LEGACY_PATHS.items():
    sys.modules.setdefault(f"{__name__}.{_old}", _module)
    if "." not in _old:
        globals().setdefault(_old, _module)
del _old, _module


def apply(
    backbone: nn.Module,
    method: str,
    *,
    targets: Targets = None,
    adapter_name: str = "default",
    **config: Any,
) -> DeltaModel:
    """Attach ``method`` to ``backbone`` and return a :class:`DeltaModel`.

    ``targets`` are semantic roles (``"attn.q"``, ``"mlp.down[0:4]"``, ``"text/attn.v"``) or
    module-name regexes; ``None`` uses the method's defaults; a rule such as
    ``unipeft.analysis.Auto(batches, loss_fn, budget=0.005)`` places the method from
    calibration batches. ``config`` holds the method's
    fields (see ``list_methods()``). The backbone is frozen; only the delta is trainable.
    On any error the backbone is left exactly as it was: a ``TypeError`` for an argument of
    the wrong type (a backbone that is not an ``nn.Module``...), a :class:`UnipeftError`
    (``ConfigError``, ``TargetError``, ``AdapterError``, ``PluginError``) naming the field,
    target or name at fault otherwise.
    """
    model = DeltaModel(backbone)
    model.add_adapter(adapter_name, method, targets=targets, **config)
    return model


def load(backbone: nn.Module, directory: str) -> DeltaModel:
    """Restore adapters written by :meth:`DeltaModel.save` onto ``backbone``.

    Every file is read and checked before the backbone is touched; on any error the
    backbone is left exactly as it was."""
    from .features.saving import plan_saved, restore_composition
    from .runtime.checks import load_directory, require_module

    require_module(backbone)
    if isinstance(backbone, DeltaModel):
        raise AdapterError(
            "backbone is already a unipeft DeltaModel; load adapters onto the plain backbone "
            "(model.unload() gives it back), or add them to this model with add_adapter()"
        )
    directory = load_directory(directory)
    plans, active, composition = plan_saved(backbone, directory, registry())
    model = DeltaModel(backbone)
    try:
        for name, plan in plans:
            model.attach(name, plan)
        restore_composition(model, composition, [a for a in active if a in model.adapters])
    except BaseException:
        if model.adapters:
            model.unload()
        raise
    return model


def list_methods() -> list[Method]:
    """Every registered method (built-in and from plugins), sorted by family then id."""
    from .contract.deltas import FAMILIES

    methods = registry().methods.values()
    return sorted(methods, key=lambda m: (FAMILIES.index(m.family), m.id))


def get_method(method_id: str) -> Method:
    return registry().method(method_id)


def plugin_manager() -> pluggy.PluginManager:
    """The pluggy plugin manager holding every loaded plugin."""
    pm = registry().manager
    assert pm is not None
    return pm


def plugin_failures() -> list[PluginFailure]:
    """Plugins that failed to import or raised in a hook (the others keep working)."""
    return list(registry().failures)


def inspect_sites(backbone: nn.Module) -> list[Site]:
    """Every site of ``backbone``: the structure map's role sites, then generic ones."""
    from .runtime.checks import require_module

    require_module(backbone)
    return all_sites(backbone, registry().pick_map(backbone))


__all__ = [
    "Adapter",
    "AdapterError",
    "AdapterPlan",
    "AdditiveDelta",
    "BudgetPlan",
    "ConfigError",
    "DeltaConfig",
    "DeltaModel",
    "DeltaModule",
    "Gate",
    "HybridDelta",
    "LoadError",
    "MergeError",
    "Method",
    "MixtureOfExpertsDelta",
    "ModuleSite",
    "PluginError",
    "PluginFailure",
    "ProjectionShape",
    "Registry",
    "ReparameterizedDelta",
    "ScalarGate",
    "SelectiveDelta",
    "SequenceSite",
    "Site",
    "TargetError",
    "UnipeftError",
    "__version__",
    "apply",
    "arithmetic",
    "compose",
    "get_method",
    "hookimpl",
    "inspect_sites",
    "interop",
    "list_methods",
    "load",
    "param_groups",
    "plan_budget",
    "plugin_failures",
    "plugin_manager",
    "register_plugin",
    "reset_registry",
    "resolve_targets",
]
