"""Mutations of saved folders for the bad-file tests: each edits one file of a copy (its
JSON, its raw bytes, or its tensors), and the names of the files and tensors they edit."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CONFIG, WEIGHTS = "unipeft_adapters.json", "unipeft_adapters.safetensors"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
SITE = "encoder.layer.0:attn.q"
SITE_PATH = f'adapters.default.sites["{SITE}"]'
KEY = f"default::{SITE}::lora.A"
MODULE = "encoder.layer.0.attention.self.query"
PEFT_A = f"base_model.model.{MODULE}.lora_A.weight"
PEFT_B = f"base_model.model.{MODULE}.lora_B.weight"

Mutation = Callable[[Path], None]


# ----------------------------------------------------------------------------- editing files


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit(name: str, change: Callable[[Any], Any]) -> Mutation:
    """Replace the JSON of ``name`` by ``change(doc)`` (or the doc ``change`` edited)."""

    def mutate(folder: Path) -> None:
        path = folder / name
        doc = json.loads(path.read_text())
        result = change(doc)
        path.write_text(json.dumps(doc if result is None else result))

    return mutate


def raw(name: str, data: bytes) -> Mutation:
    return lambda folder: (folder / name).write_bytes(data)


def delete(name: str) -> Mutation:
    return lambda folder: (folder / name).unlink()


def tensors(name: str, change: Callable[[dict[str, torch.Tensor]], None], reseal: bool) -> Mutation:
    """Rewrite the safetensors file ``name``; ``reseal``: record the new file's checksum in
    the unipeft config, so that only the tensor checks can catch the change."""

    def mutate(folder: Path) -> None:
        found = load_file(str(folder / name))
        change(found)
        save_file(found, str(folder / name))
        if reseal:
            edit(CONFIG, lambda d: d.update(weights_sha256=_sha(folder / name)))(folder)

    return mutate


def both(*mutations: Mutation) -> Mutation:
    def mutate(folder: Path) -> None:
        for m in mutations:
            m(folder)

    return mutate


def sets(*path: Any, value: Any) -> Callable[[Any], None]:
    """A change that sets ``doc[path[0]]...[path[-1]] = value``."""

    def change(doc: Any) -> None:
        node = doc
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value

    return change


def drops(*path: Any) -> Callable[[Any], None]:
    def change(doc: Any) -> None:
        node = doc
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]

    return change


def put(key: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.__setitem__(key, value)


def cast(key: str, dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.__setitem__(key, t[key].to(dtype))


def pop(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(t: dict[str, torch.Tensor]) -> None:
        del t[key]

    return change


def rename(adapter: str) -> Callable[[Any], None]:
    def change(doc: Any) -> None:
        doc["adapters"][adapter] = doc["adapters"].pop("default")
        doc["active"] = [adapter]

    return change


def to_v1(doc: Any) -> None:
    """The same save, as format version 1 wrote it (per tensor a shape, no dtype)."""
    doc["format_version"] = 1
    for adapter in doc["adapters"].values():
        for site, params in adapter["sites"].items():
            adapter["sites"][site] = {p: e["shape"] for p, e in params.items()}
