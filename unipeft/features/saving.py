"""Saving and loading adapters: safetensors for tensors, JSON for everything else.

Loading never executes code from a file. Tensor keys are
``<adapter>::<site name>::<method id>.<parameter>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .._version import __version__
from ..contract.errors import AdapterError, LoadError
from ..contract.plan import AdapterPlan, adapter_name_refusal
from ..runtime.targets import all_sites

if TYPE_CHECKING:
    from ..model import DeltaModel
    from ..runtime.registry import Registry

CONFIG_FILE = "unipeft_adapters.json"
TMP_PREFIX = ".unipeft-tmp-"
WEIGHTS_FILE = "unipeft_adapters.safetensors"
FORMAT_VERSION = 1


def tensor_key(adapter: str, site_name: str, method_id: str, param: str) -> str:
    return f"{adapter}::{site_name}::{method_id}.{param}"


def save_adapters(
    model: DeltaModel, directory: str | os.PathLike, names: Sequence[str] | None
) -> None:
    names = list(names) if names is not None else list(model.adapters)
    if not names:
        raise AdapterError("there is no adapter to save; add_adapter() first")
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name in names:
        adapter = model.get_adapter(name)
        sites: dict[str, dict[str, list[int]]] = {}
        for site in adapter.sites:
            delta = adapter.delta_at(site)
            shapes = {}
            for pname, tensor in delta.state_dict().items():
                key = tensor_key(name, site.name, adapter.method.id, pname)
                tensors[key] = tensor.detach().to("cpu").contiguous()
                shapes[pname] = list(tensor.shape)
            sites[site.name] = shapes
        meta[name] = {
            "method": adapter.method.id,
            "method_distribution": adapter.method.distribution,
            "config": adapter.config.model_dump(mode="json"),
            "targets": adapter.targets,
            "sites": sites,
        }
    doc = {
        "format": "unipeft",
        "format_version": FORMAT_VERSION,
        "unipeft_version": __version__,
        "backbone": type(model.base_model).__name__,
        "structure_map": model.structure_map,
        "active": [a for a in model.active_adapters if a in names],
        "adapters": meta,
    }
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    _settle(target)
    # Write both files into a temporary folder beside the destination, fsync, then rename
    # each into place (each rename is atomic). A kill between the two renames leaves the new
    # weights beside the old config, and the new config in the temporary folder: the weights'
    # SHA-256 in each config tells which config belongs to the live weights, so load() and
    # the next save() find the new pair (see _matching_config). Nothing else is ever partial.
    with tempfile.TemporaryDirectory(dir=target, prefix=TMP_PREFIX) as tmp:
        weights = os.path.join(tmp, WEIGHTS_FILE)
        save_file(tensors, weights, metadata={"format": "unipeft"})
        doc["weights_sha256"] = _sha256(weights)
        config = os.path.join(tmp, CONFIG_FILE)
        with open(config, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2, sort_keys=True)
        for path in (weights, config, tmp):
            _fsync(path)
        os.replace(weights, target / WEIGHTS_FILE)
        _fsync(str(target))
        os.replace(config, target / CONFIG_FILE)
        _fsync(str(target))


def _settle(target: Path) -> None:
    """Before a save: finish a save that was killed between its two renames (its config is
    still in its temporary folder), then remove the temporary folders killed saves left."""
    weights, config = target / WEIGHTS_FILE, target / CONFIG_FILE
    if weights.is_file() and _config_checksum(config) != (live := _sha256(weights)):
        waiting = _matching_config(target, live)
        if waiting is not None:
            os.replace(waiting, config)
            _fsync(str(target))
    # what is left in temporary folders pairs with no live file: half-written new saves
    for stale in target.glob(f"{TMP_PREFIX}*"):
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


def _matching_config(target: Path, checksum: str) -> Path | None:
    """The config a killed save left in its temporary folder for weights of ``checksum``."""
    for candidate in sorted(target.glob(f"{TMP_PREFIX}*/{CONFIG_FILE}")):
        if _config_checksum(candidate) == checksum:
            return candidate
    return None


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


def read_saved(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    d = Path(directory)
    cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
    live = _sha256(w_path) if w_path.is_file() else None
    if live is not None and _config_checksum(cfg_path) != live:
        # a save killed between its renames: its config, which matches the live weights,
        # is still in its temporary folder (read it there; load never changes the folder)
        cfg_path = _matching_config(d, live) or cfg_path
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise LoadError(f"{p} does not exist; is {d} a directory written by DeltaModel.save()?")
    try:
        doc = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoadError(f"{cfg_path} is not valid JSON: {exc}") from None
    if (
        not isinstance(doc, dict)
        or doc.get("format") != "unipeft"
        or not isinstance(doc.get("adapters"), dict)
    ):
        raise LoadError(f"{cfg_path} is not a unipeft adapter config")
    if doc.get("format_version", 0) > FORMAT_VERSION:
        raise LoadError(
            f"{cfg_path} has format version {doc['format_version']}; this unipeft "
            f"({__version__}) reads up to {FORMAT_VERSION}: upgrade unipeft"
        )
    expected = doc.get("weights_sha256")
    if expected is not None and live != expected:
        raise LoadError(
            f"{w_path} does not match {cfg_path} (checksum differs): the two files come from "
            "different saves or the weights were modified; save the adapters again"
        )
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoadError(
            f"{w_path} is not a readable safetensors file ({exc}); it may be truncated"
        ) from None
    return doc, tensors


def plan_adapters(
    backbone: nn.Module, directory: str | os.PathLike, registry: Registry
) -> tuple[list[tuple[str, AdapterPlan]], list[str]]:
    """The adapters saved in ``directory`` as plans for ``backbone`` (every tensor checked
    against the delta it will fill), and the names that were active. Reads only JSON and
    safetensors; changes nothing."""
    doc, tensors = read_saved(directory)
    smap = registry.pick_map(backbone)
    by_name = {s.name: s for s in all_sites(backbone, smap)}

    for name in doc["adapters"]:
        reason = adapter_name_refusal(name)
        if reason is not None:
            raise LoadError(
                f"{Path(directory) / CONFIG_FILE} names an adapter that cannot be loaded: {reason}"
            )
    plans = []
    for name, meta in doc["adapters"].items():
        spec = registry.method(meta["method"])
        cfg = spec.config.parse(spec.id, meta.get("config", {}))
        sites = []
        state: dict[str, dict[str, torch.Tensor]] = {}
        for site_name, _shapes in meta["sites"].items():
            site = by_name.get(site_name)
            if site is None:
                raise LoadError(
                    f"adapter {name!r} was saved for a backbone with a site {site_name!r}, which "
                    f"this {type(backbone).__name__} does not have: it was saved for a "
                    f"different architecture ({doc.get('backbone')})"
                )
            with torch.random.fork_rng(devices=[]):  # a probe: leave the RNG as it was
                delta = spec.build(cfg, site)
            state[site_name] = {}
            for pname, tensor in delta.state_dict().items():
                key = tensor_key(name, site_name, spec.id, pname)
                if key not in tensors:
                    raise LoadError(f"{WEIGHTS_FILE} lacks tensor {key!r}; the file is incomplete")
                if tuple(tensors[key].shape) != tuple(tensor.shape):
                    raise LoadError(
                        f"adapter {name!r} at site {site_name!r}: saved {pname} has shape "
                        f"{tuple(tensors[key].shape)} but this backbone needs "
                        f"{tuple(tensor.shape)}; it was saved for a backbone of another shape"
                    )
                state[site_name][pname] = tensors[key]
            sites.append(site)
        targets = tuple(meta.get("targets") or ())
        plans.append((name, AdapterPlan(spec, cfg, tuple(sites), targets, state, smap.name)))
    return plans, list(doc.get("active", []))
