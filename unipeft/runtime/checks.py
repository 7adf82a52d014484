"""Argument checks of the public API: each refusal names the argument and what it accepts.

Every check here only reads its arguments, so a refused call has changed nothing yet. The
model calls them first, then the checks of its sites (:func:`check_sites`,
:func:`check_sizes`), then builds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

from ..contract.config import DeltaConfig
from ..contract.errors import AdapterError, ConfigError, LoadError, MergeError, TargetError
from ..contract.method import Method, site_kinds_of
from ..contract.plan import AdapterPlan
from ..contract.sites import ModuleSite, Site


def _got(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def require_module(value: object, argument: str = "backbone") -> nn.Module:
    """``value`` if it is a ``torch.nn.Module``; a :class:`TypeError` naming ``argument``."""
    if not isinstance(value, nn.Module):
        raise TypeError(
            f"{argument} must be a torch.nn.Module (the model to adapt, e.g. a transformers "
            f"or timm model instance), got {_got(value)}"
        )
    return value


def require_method_id(value: object, argument: str = "method") -> str:
    """``value`` if it is a method id string; a :class:`TypeError` otherwise."""
    if not isinstance(value, str):
        raise TypeError(
            f"{argument} must be a method id, a string such as 'lora' (unipeft.list_methods() "
            f"lists them), got {_got(value)}"
        )
    return value


@runtime_checkable
class TargetRule(Protocol):
    """Targets worked out on the model itself when an adapter is planned
    (:class:`unipeft.analysis.Auto`: scored on calibration batches, placed under a budget)."""

    def targets_for(self, model: nn.Module, method: str, config: Mapping[str, Any]) -> list[str]:
        """The target strings for ``method`` with ``config`` on ``model``."""
        ...


Targets = Sequence[str] | str | TargetRule | None
"""What ``targets`` accepts: target strings, one string, a :class:`TargetRule`, or ``None``
for the method's defaults."""


def target_list(
    targets: object,
    model: nn.Module | None = None,
    method: str = "",
    config: Mapping[str, Any] | None = None,
) -> list[str] | None:
    """``targets`` as a list of strings (one string is one target), or ``None``; a
    :class:`TargetRule` gives its targets for ``method`` with ``config`` on ``model``.

    Anything else (a number, a mapping, a set, a list with a non-string item) raises
    :class:`TargetError` naming the culprit, and so does an empty list (``None`` asks for
    the method's defaults)."""
    if targets is None:
        return None
    if isinstance(targets, TargetRule) and model is not None:
        targets = targets.targets_for(model, method, dict(config or {}))
    if targets == "auto":
        raise TargetError(
            "targets='auto' needs calibration batches and a budget to place the method: pass "
            "targets=unipeft.analysis.Auto(batches, loss_fn, budget=0.005) (docs/analysis.md)"
        )
    if isinstance(targets, str):
        return [targets]
    if isinstance(targets, Mapping | bytes | bytearray) or not isinstance(targets, Sequence):
        raise TargetError(
            f"targets must be a list of target strings such as ['attn.q', 'attn.v'] (or one "
            f"string, or None for the method's defaults), got {_got(targets)}"
        )
    out = list(targets)
    if not out:
        raise TargetError(
            "targets is empty; name at least one role or module regex, or pass None for the "
            "method's default targets"
        )
    for i, t in enumerate(out):
        if not isinstance(t, str) or not t or t == "?":
            raise TargetError(
                f"targets[{i}] is {_got(t)}; each target must be a non-empty string: a role "
                "such as 'attn.q' or 'mlp.down[0:2]', or a module-name regex such as "
                "'re:.*\\.fc1' (see docs/targets.md)"
            )
    return out


def adapter_names(value: object, argument: str, *, allow_empty: bool = True) -> list[str]:
    """One adapter name or a list of them, as a list; a :class:`TypeError` for any other
    type, an :class:`AdapterError` for a name given twice."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping | bytes | bytearray) or not isinstance(value, Sequence):
        raise TypeError(
            f"{argument} must be an adapter name or a list of adapter names, got {_got(value)}"
        )
    names = list(value)
    for i, n in enumerate(names):
        if not isinstance(n, str):
            raise TypeError(f"{argument}[{i}] must be an adapter name (a string), got {_got(n)}")
    if not names and not allow_empty:
        raise AdapterError(f"{argument} is empty; give at least one adapter name")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise AdapterError(f"{argument} names adapter {n!r} more than once")
        seen.add(n)
    return names


def sample_names(value: object) -> tuple[str, ...]:
    """A mixed batch's ``adapter_names``: a non-empty list of strings, one per sample;
    anything else raises :class:`AdapterError` (a ``ValueError``) naming ``adapter_names``."""
    if isinstance(value, str | bytes | bytearray | Mapping) or not isinstance(value, Sequence):
        raise AdapterError(
            "adapter_names must be a non-empty list of adapter names, one name per sample "
            f'("__base__" for the plain backbone), got {_got(value)}'
        )
    names = tuple(value)
    if not names:
        raise AdapterError("adapter_names is empty; give one adapter name per sample")
    for i, n in enumerate(names):
        if not isinstance(n, str):
            raise AdapterError(
                f'adapter_names[{i}] must be an adapter name (a string) or "__base__", '
                f"got {_got(n)}"
            )
    return names


def require_adapter_name(value: object, argument: str = "name") -> str:
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be an adapter name (a string), got {_got(value)}")
    return value


def save_directory(directory: object) -> Path:
    """Where ``save`` writes: a path (str or os.PathLike) that is a directory or does not
    exist yet, and whose nearest existing parent is a directory."""
    if not isinstance(directory, str | os.PathLike) or isinstance(directory, bytes):
        raise TypeError(
            f"directory must be a path (str or os.PathLike) of a folder to write, got "
            f"{_got(directory)}"
        )
    path = Path(directory)
    if not str(directory):
        raise ValueError("directory is an empty path; name the folder to write the adapters to")
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "is" if p == path else f"is inside {str(p)!r}, which is"
                raise ValueError(
                    f"directory {str(path)!r} {where} a file, not a folder; save() writes a "
                    "folder (created if missing): give a folder path"
                )
            break
    return path


def load_directory(directory: object) -> Path:
    """The folder ``unipeft.load`` reads: a path whose target, if it exists, is a folder."""
    if not isinstance(directory, str | os.PathLike) or isinstance(directory, bytes):
        raise TypeError(
            f"directory must be the path (str or os.PathLike) of a folder written by "
            f"DeltaModel.save(), got {_got(directory)}"
        )
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise LoadError(
            f"directory {str(path)!r} is a file; give the folder DeltaModel.save() wrote"
        )
    return path


def merge_refusal(site: Site) -> str | None:
    if not isinstance(site, ModuleSite):
        return f"site {site.name!r} is a token sequence"
    return site.merge_refusal()


def all_refused(
    spec: Method, cfg: DeltaConfig, found: list, kept: list, targets: list[str], backbone: Any
) -> None:
    """Raise :class:`TargetError` when the targets reached sites but the method refused
    every one of them (each was optional, so none was an error on its own)."""
    if found and not kept:
        reason = spec.refusal(cfg, found[0])
        raise TargetError(
            f"targets {targets} match nothing method {spec.id!r} can attach to on "
            f"{type(backbone).__name__}: {reason}"
        )


def check_sites(spec: Method, cfg: DeltaConfig, sites: list[Site], targets: list[str]) -> None:
    """Raise :class:`TargetError` unless ``spec`` can attach at every site."""
    if not sites:
        raise TargetError(
            f"method {spec.id!r} found no site it can attach to among targets {targets}"
        )
    refused = [(s, r) for s in sites if (r := spec.refusal(cfg, s)) is not None]
    if not refused:
        return
    site, reason = refused[0]
    more = f" ({len(refused) - 1} more sites refused)" if len(refused) > 1 else ""
    if set(site_kinds_of(site)) & set(spec.site_kinds):  # the method's own check refused it
        hint = "Choose targets this method accepts, or change the config."
    else:
        hint = f"Choose targets of the kinds it accepts: {', '.join(spec.site_kinds)}."
    raise TargetError(
        f"method {spec.id!r} cannot attach where targets {targets} point: {reason}{more}. {hint}"
    )


def check_sizes(spec: Method, cfg: DeltaConfig, sites: Sequence[Site]) -> None:
    """Raise :class:`ConfigError` when the config's sizes do not fit a site (the method's
    :attr:`~unipeft.contract.method.Method.size_check`): the message names the field and
    the limit."""
    for site in sites:
        reason = spec.size_refusal(cfg, site)
        if reason is not None:
            raise ConfigError(
                f"invalid configuration for method {spec.id!r} at site {site.name!r}: {reason}"
            )


def plan_type(plan: Any) -> None:
    if not isinstance(plan, AdapterPlan):
        raise TypeError(
            f"plan must be a unipeft.AdapterPlan (from model.plan(...) or built by an "
            f"importer), got {_got(plan)}"
        )


def sites_in(backbone: nn.Module, sites: Sequence[Site]) -> None:
    """Raise :class:`TargetError` unless every module ``sites`` hook into is part of
    ``backbone`` (a plan made for another model would change that model instead)."""
    own = {id(m) for m in backbone.modules()}
    for site in sites:
        parts = (
            (site.module, site.entry, site.host)
            if isinstance(site, ModuleSite)
            else (site.insert, site.strip, site.embedding)
        )
        if any(m is not None and id(m) not in own for m in parts):
            raise TargetError(
                f"site {site.name!r} of the plan belongs to another model, not to this "
                f"{type(backbone).__name__}: plan on this model (model.plan(...)) or take the "
                "sites from unipeft.inspect_sites(backbone)"
            )


def refuse_sharded(model: nn.Module, operation: str) -> None:
    """Raise :class:`MergeError` when ``model``'s weights are sharded by FSDP (1 or 2) or
    DeepSpeed ZeRO-3: ``operation`` (merge, unmerge, unload, delete_adapter) rewrites whole
    weights or removes parameters the engine manages, and no rank holds them whole. Merging
    and unmerging under ZeRO-3 are allowed: the ledger gathers each weight it folds into,
    and DeepSpeed partitions rank 0's result back."""
    from ..distributed.gather import sharding_engine

    engine = sharding_engine(model)
    if engine is None or (engine == "zero3" and operation in ("merge", "unmerge")):
        return  # ZeRO-3: the merge ledger gathers what it folds (GatheredParameters)
    names = {"fsdp2": "FSDP2 (fully_shard)", "fsdp1": "FSDP1", "zero3": "DeepSpeed ZeRO-3"}
    raise MergeError(
        f"{operation}() on a model sharded by {names[engine]}: no rank holds the backbone's "
        "weights whole, and the engine owns the adapters' parameters. Save the adapters on "
        "every rank (model.save(dir)), then in one process load them onto an unsharded "
        f"backbone (unipeft.load(backbone, dir)) and call {operation}() there"
    )
