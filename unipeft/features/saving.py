"""Saving and loading adapters: safetensors for tensors, JSON for everything else.

Loading never executes code from a file. Tensor keys are
``<adapter>::<site name>::<method id>.<parameter>``; the JSON's schema (format versions 1 and
2) and the check of the tensors against it are in :mod:`unipeft.features._format`.

:func:`write_pair` is the crash-safe write of a weights file and its config, shared with
the PEFT exporter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .._version import __version__
from ..compose import Composition, Fuse
from ..compose import from_json as composition_from_json
from ..contract.errors import AdapterError, ConfigError, LoadError, PluginError
from ..contract.plan import SHARED, AdapterPlan, adapter_name_refusal
from ..distributed.gather import on_main, sharding_engine, whole_deltas
from ..runtime.targets import all_sites
from ._format import (
    FORMAT_VERSION,
    UNCHECKED,
    Saved,
    check_tensors,
    dtype_name,
    fusion_key,
    json_path,
    parse_saved,
    read_json,
    tensor_key,
)

if TYPE_CHECKING:
    from ..model import DeltaModel
    from ..runtime.registry import Registry

__all__ = [
    "FORMAT_VERSION",
    "UNCHECKED",
    "SavedComposition",
    "plan_adapters",
    "plan_saved",
    "restore_composition",
    "save_adapters",
    "tensor_key",
]

CONFIG_FILE = "unipeft_adapters.json"
TMP_PREFIX = ".unipeft-tmp-"
WEIGHTS_FILE = "unipeft_adapters.safetensors"
PAIR_FILE = "weights.sha256"
"""In a temporary folder: the SHA-256 of the weights its config belongs with."""


def save_adapters(
    model: DeltaModel, directory: str | os.PathLike, names: Sequence[str] | None
) -> None:
    names = list(names) if names is not None else list(model.adapters)
    if not names:
        raise AdapterError("there is no adapter to save; add_adapter() first")
    engine = sharding_engine(model)
    with whole_deltas(model):  # sharded (FSDP, ZeRO-3): every rank gathers, rank 0 writes
        doc, tensors = _collect(model, names)

    def config_bytes(checksum: str) -> bytes:
        return json.dumps({**doc, "weights_sha256": checksum}, indent=2, sort_keys=True).encode()

    on_main(
        lambda: write_pair(
            Path(directory), tensors, {"format": "unipeft"}, config_bytes,
            weights_name=WEIGHTS_FILE, config_name=CONFIG_FILE, prefix=TMP_PREFIX,
        ),
        collective=engine is not None,
    )  # fmt: skip


def _collect(model: DeltaModel, names: list[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON document and the tensors (on the CPU) of the adapters ``names``."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name in names:
        adapter = model.get_adapter(name)
        sites: dict[str, dict[str, dict[str, Any]]] = {}
        owners: list[tuple[str, nn.Module]] = [(s.name, adapter.delta_at(s)) for s in adapter.sites]
        if adapter.shared is not None:  # the adapter's shared tensors: saved once
            owners.append((SHARED, adapter.shared))
        for site_name, owner in owners:
            described = {}
            for pname, tensor in owner.state_dict().items():
                key = tensor_key(name, site_name, adapter.method.id, pname)
                tensors[key] = tensor.detach().to("cpu", copy=True).contiguous()
                described[pname] = {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}
            sites[site_name] = described
        meta[name] = {
            "method": adapter.method.id,
            "method_distribution": adapter.method.distribution,
            "config": adapter.config.model_dump(mode="json"),
            "targets": list(adapter.targets),
            "sites": sites,
        }
    extra = _composition_entries(model, names, tensors)
    doc = {
        **extra,
        "format": "unipeft",
        "format_version": FORMAT_VERSION,
        "unipeft_version": __version__,
        "backbone": type(model.base_model).__name__,
        "structure_map": model.structure_map,
        "active": [a for a in model.active_adapters if a in names],
        "adapters": meta,
    }
    return doc, tensors


def _composition_entries(
    model: DeltaModel, names: Sequence[str], tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """The JSON fields ``composition`` and ``fusions`` for the saved adapters ``names`` (only
    those whose adapters are all saved; none at all when there is nothing to record), and
    the fusion layers' tensors added to ``tensors``."""
    out: dict[str, Any] = {}
    fusions: dict[str, Any] = {}
    for fname, fusion in model.fusions.items():
        if not set(fusion.spec.leaves()) <= set(names):  # type: ignore[union-attr]
            continue
        sites: dict[str, dict[str, Any]] = {}
        for key, layer in fusion.items():  # type: ignore[operator]
            site_name = fusion.site_names[key]  # type: ignore[index]
            described = {}
            for pname, tensor in layer.state_dict().items():
                tensors[fusion_key(fname, site_name, pname)] = tensor.detach().to("cpu", copy=True)
                described[pname] = {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}
            sites[site_name] = described
        fusions[fname] = {"fuse": fusion.spec.to_json(), "sites": sites}  # type: ignore[union-attr]
    if fusions:
        out["fusions"] = fusions
    comp = model.active_composition
    if comp is not None and set(comp.leaves()) <= set(names):
        out["composition"] = comp.to_json()
    return out


def write_pair(
    target: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    config_bytes: Callable[[str], bytes],
    *,
    weights_name: str,
    config_name: str,
    prefix: str,
) -> None:
    """Write ``weights_name`` (``tensors``) and ``config_name`` (``config_bytes(weights'
    SHA-256)``) into ``target`` so that a kill at any instant leaves the old pair or the new.

    Both files go into a temporary folder beside the destination with ``PAIR_FILE`` (the
    weights' SHA-256), are fsynced, then each is renamed into place (each rename is atomic).
    A kill between the two renames leaves the new weights beside the old config, and the
    new config in the temporary folder, whose ``PAIR_FILE`` matches the live weights: the
    readers and the next write find it there (see :func:`matching_config`). Nothing else is
    ever partial; the next write removes the temporary folders killed writes left.
    """
    target.mkdir(parents=True, exist_ok=True)
    _settle(target, weights_name, config_name, prefix)
    with tempfile.TemporaryDirectory(dir=target, prefix=prefix) as tmp:
        weights = os.path.join(tmp, weights_name)
        save_file(tensors, weights, metadata=metadata)
        checksum = _sha256(weights)
        config = os.path.join(tmp, config_name)
        with open(config, "wb") as fh:
            fh.write(config_bytes(checksum))
        with open(os.path.join(tmp, PAIR_FILE), "w", encoding="ascii") as fh:
            fh.write(checksum)
        for path in (weights, config, os.path.join(tmp, PAIR_FILE), tmp):
            _fsync(path)
        os.replace(weights, target / weights_name)
        _fsync(str(target))
        os.replace(config, target / config_name)
        _fsync(str(target))


def _settle(
    target: Path,
    weights_name: str = WEIGHTS_FILE,
    config_name: str = CONFIG_FILE,
    prefix: str = TMP_PREFIX,
) -> None:
    """Before a write: finish a write that was killed between its two renames (its config
    is still in its temporary folder), then remove the temporary folders killed writes left."""
    weights, config = target / weights_name, target / config_name
    if weights.is_file() and _config_checksum(config) != (live := _sha256(weights)):
        waiting = matching_config(target, live, config_name, prefix)
        if waiting is not None:
            os.replace(waiting, config)
            _fsync(str(target))
    # what is left in temporary folders pairs with no live file: half-written new saves
    for stale in target.glob(f"{prefix}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _config_checksum(path: Path) -> str | None:
    """The ``weights_sha256`` a config file records, or None if it has none or is unreadable."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = doc.get("weights_sha256") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


def _recorded(folder: Path, config_name: str) -> str | None:
    """The SHA-256 of the weights the config in temporary folder ``folder`` belongs with."""
    try:
        return (folder / PAIR_FILE).read_text(encoding="ascii").strip()
    except (OSError, ValueError):
        return _config_checksum(folder / config_name)  # a folder an older unipeft left


def matching_config(
    target: Path, checksum: str, config_name: str = CONFIG_FILE, prefix: str = TMP_PREFIX
) -> Path | None:
    """The config a killed write left in its temporary folder for weights of ``checksum``."""
    for folder in sorted(target.glob(f"{prefix}*")):
        candidate = folder / config_name
        if candidate.is_file() and _recorded(folder, config_name) == checksum:
            return candidate
    return None


def live_config(target: Path, weights_name: str, config_name: str, prefix: str) -> Path:
    """The config that belongs with the live weights of ``target``: the live one, or the one
    a write killed between its renames left in its temporary folder. Changes nothing."""
    weights, config = target / weights_name, target / config_name
    if not weights.is_file():
        return config
    live = _sha256(weights)
    if _config_checksum(config) == live:
        return config
    return matching_config(target, live, config_name, prefix) or config


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the data is still written
        pass
    finally:
        os.close(fd)


def read_saved(
    directory: str | os.PathLike,
) -> tuple[Saved, dict[str, torch.Tensor], Path]:
    """The validated config, the tensors and the config's path of a saved folder (the
    tensors are checked against the config by :func:`plan_adapters`). Reads only."""
    d = Path(directory)
    w_path = d / WEIGHTS_FILE
    # after a save killed between its renames, the config that matches the live weights is
    # still in its temporary folder: read it there (load never changes the folder)
    cfg_path = live_config(d, WEIGHTS_FILE, CONFIG_FILE, TMP_PREFIX)
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise LoadError(f"{p} does not exist; is {d} a directory written by DeltaModel.save()?")
    doc = parse_saved(cfg_path, read_json(cfg_path))
    _check_names(doc, cfg_path)
    if doc.weights_sha256 != UNCHECKED and _sha256(w_path) != doc.weights_sha256:
        raise LoadError(
            f"{w_path} does not match {cfg_path} (checksum differs): the two files come from "
            "different saves or the weights were modified; save the adapters again (for a "
            f'file edited by hand on purpose, set "weights_sha256": "{UNCHECKED}" in the config)'
        )
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoadError(
            f"{w_path} is not a readable safetensors file ({exc}); it may be truncated"
        ) from None
    return doc, tensors, cfg_path


def _check_names(doc: Saved, cfg_path: Path) -> None:
    """Every adapter name follows the names rule; every active name is an adapter's."""
    for name in doc.adapters:
        reason = adapter_name_refusal(name)
        if reason is not None:
            raise LoadError(
                f"{cfg_path} names an adapter that cannot be loaded, at "
                f"{json_path(('adapters', name))}: {reason}"
            )
    for i, name in enumerate(doc.active):
        if name not in doc.adapters:
            raise LoadError(
                f"{cfg_path}: field active[{i}] = {name!r} is refused: it names no adapter of "
                f"the file (accepted: names among {', '.join(doc.adapters)})"
            )


class SavedComposition:
    """What a save records beyond its adapters: the active composition (or None) and the
    fusion layers (each ``Fuse`` with its tensors by site), read and checked, not applied."""

    def __init__(
        self,
        path: Path,
        composition: Composition | None,
        fusions: list[tuple[Fuse, dict[str, dict[str, torch.Tensor]]]],
    ) -> None:
        self.path = path
        self.composition = composition
        self.fusions = fusions


def _read_composition(doc: Saved, tensors: dict[str, torch.Tensor], path: Path) -> SavedComposition:
    """The composition and fusions of ``doc``, every name checked against its adapters."""
    fusions = []
    for fname, saved in getattr(doc, "fusions", {}).items():
        where = json_path(("fusions", fname, "fuse"))
        try:
            spec = composition_from_json(saved.fuse, where)
        except ConfigError as exc:
            raise LoadError(f"{path}: {exc}") from None
        if not isinstance(spec, Fuse) or spec.name != fname:
            raise LoadError(f"{path}, field {where}: a Fuse named {fname!r} is needed here")
        _known_leaves(doc, spec, path, where)
        state = {
            site: {p: tensors[fusion_key(fname, site, p)] for p in params}
            for site, params in saved.sites.items()
        }
        fusions.append((spec, state))
    comp = None
    raw = getattr(doc, "composition", None)
    if raw is not None:
        try:
            comp = composition_from_json(raw)
        except ConfigError as exc:
            raise LoadError(f"{path}: {exc}") from None
        _known_leaves(doc, comp, path, "composition")
    return SavedComposition(path, comp, fusions)


def _known_leaves(doc: Saved, comp: Composition, path: Path, where: str) -> None:
    unknown = [n for n in comp.leaves() if n not in doc.adapters]
    if unknown:
        raise LoadError(
            f"{path}, field {where} names adapters {unknown}, which the file does not hold "
            f"(it holds {', '.join(doc.adapters)})"
        )


def restore_composition(model: DeltaModel, saved: SavedComposition, active: list[str]) -> None:
    """Rebuild the saved fusion layers on ``model`` and activate the saved composition (or
    the saved active names); errors are LoadErrors naming the file."""
    try:
        for spec, state in saved.fusions:
            model.add_fusion(spec, state)
        if saved.composition is not None:
            model.set_active(saved.composition)
        elif active:
            model.set_active(active)
    except (AdapterError, ConfigError) as exc:
        raise LoadError(f"{saved.path}: the saved composition cannot be restored: {exc}") from None


def plan_adapters(
    backbone: nn.Module, directory: str | os.PathLike, registry: Registry
) -> tuple[list[tuple[str, AdapterPlan]], list[str]]:
    """The adapters saved in ``directory`` as plans for ``backbone`` (every tensor checked
    against the delta it will fill), and the names that were active. Reads only JSON and
    safetensors; changes nothing."""
    plans, active, _ = plan_saved(backbone, directory, registry)
    return plans, active


def plan_saved(
    backbone: nn.Module, directory: str | os.PathLike, registry: Registry
) -> tuple[list[tuple[str, AdapterPlan]], list[str], SavedComposition]:
    """:func:`plan_adapters`, and the saved composition and fusions (checked, not applied:
    :func:`restore_composition` does that once the plans are attached)."""
    doc, tensors, cfg_path = read_saved(directory)
    smap = registry.pick_map(backbone)
    by_name = {s.name: s for s in all_sites(backbone, smap)}
    resolved = []  # first what the JSON says, against the registry and the backbone
    for name, meta in doc.adapters.items():
        where = json_path(("adapters", name))
        try:
            spec = registry.method(meta.method)
        except PluginError as exc:
            raise PluginError(f"{cfg_path}, field {where}.method: {exc}") from None
        try:
            cfg = spec.config.parse(spec.id, meta.config)
        except ConfigError as exc:
            raise LoadError(f"{cfg_path}, field {where}.config: {exc}") from None
        if (SHARED in meta.sites) != (spec.shared is not None):
            what = "has no" if spec.shared is not None else f"has a {SHARED!r} entry, but"
            raise LoadError(
                f"{cfg_path}, field {where}.sites: method {spec.id!r} "
                f"{'keeps' if spec.shared is not None else 'keeps no'} tensors shared by its "
                f"sites, and the file {what} {SHARED!r} entry (a file of another method "
                "version, or edited by hand)"
            )
        for site_name in meta.sites:
            if site_name not in by_name and site_name != SHARED:
                raise LoadError(
                    f"{cfg_path}, field {where}.sites: adapter {name!r} was saved for a backbone "
                    f"with a site {site_name!r}, which this {type(backbone).__name__} does not "
                    f"have: it was saved for a different architecture ({doc.backbone})"
                )
        resolved.append((name, meta, spec, cfg))
    # then the tensors against the JSON, then against the deltas they will fill
    weights = Path(directory) / WEIGHTS_FILE
    check_tensors(doc, tensors, weights, cfg_path)
    plans = []
    for name, meta, spec, cfg in resolved:
        sites = [by_name[n] for n in meta.sites if n != SHARED]
        state: dict[str, dict[str, torch.Tensor]] = {}
        with torch.random.fork_rng(devices=[]):  # a probe: leave the RNG as it was
            shared = spec.build_shared(cfg, tuple(sites))
            for site_name, described in meta.sites.items():
                if site_name == SHARED:
                    probe = shared
                elif shared is None:
                    probe = spec.build(cfg, by_name[site_name])
                else:
                    probe = spec.build(cfg, by_name[site_name], shared)
                state[site_name] = _site_state(
                    (cfg_path, weights), name, site_name, spec.id, probe.state_dict(),
                    set(described), tensors,
                )  # fmt: skip
        plans.append(
            (name, AdapterPlan(spec, cfg, tuple(sites), tuple(meta.targets), state, smap.name))
        )
    return plans, list(doc.active), _read_composition(doc, tensors, cfg_path)


def _site_state(
    files: tuple[Path, Path],
    name: str,
    site_name: str,
    method_id: str,
    wanted: dict[str, torch.Tensor],
    described: set[str],
    tensors: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The saved tensors of one site, each checked against the delta that will hold it."""
    cfg_path, weights = files
    where = json_path(("adapters", name, "sites", site_name))
    missing, extra = sorted(set(wanted) - described), sorted(described - set(wanted))
    if missing or extra:
        what = f"lacks {missing}" if missing else f"has {extra}, which the delta does not have"
        raise LoadError(
            f"{cfg_path}, field {where}: {what}; {method_id}'s delta at this site has "
            f"exactly {sorted(wanted)} (a file of another method version, or edited by hand)"
        )
    out = {}
    for pname, tensor in wanted.items():
        key = tensor_key(name, site_name, method_id, pname)
        saved = tensors[key]
        if tuple(saved.shape) != tuple(tensor.shape):
            raise LoadError(
                f"adapter {name!r} at site {site_name!r}: saved {pname} ({key!r}) has shape "
                f"{tuple(saved.shape)} but this backbone needs {tuple(tensor.shape)}; it was "
                "saved for a backbone of another shape"
            )
        if saved.is_floating_point() != tensor.is_floating_point() or (
            not tensor.is_floating_point() and saved.dtype != tensor.dtype
        ):
            need = (
                "a floating-point tensor"
                if tensor.is_floating_point()
                else dtype_name(tensor.dtype)
            )
            raise LoadError(
                f"{weights}: tensor {key!r} is "
                f"{dtype_name(saved.dtype)}, but the delta needs {need}; unipeft converts "
                "between floating-point dtypes only"
            )
        out[pname] = saved
    return out
