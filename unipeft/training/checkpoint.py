"""Checkpoints written atomically: a kill at any moment leaves the last complete one intact.

``output_dir/checkpoint/`` is only ever created by renaming a fully written, fsynced
temporary directory. A write goes:

1. write every file into ``output_dir/.checkpoint.tmp/`` and fsync them and the folder;
2. rename ``checkpoint/`` to ``.checkpoint.old/`` (if there is one);
3. rename ``.checkpoint.tmp/`` to ``checkpoint/`` and fsync ``output_dir``;
4. delete ``.checkpoint.old/``.

A kill before step 3 leaves ``checkpoint/`` or, between steps 2 and 3, ``.checkpoint.old/``
complete; :func:`recover` puts that one back at ``checkpoint/`` and deletes the rest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

from ..features._format import dtype_name, need_object, read_json, schema_message
from .config import TrainerConfig
from .state import CheckpointError

CHECKPOINT = "checkpoint"
FORMAT = "unipeft-checkpoint"
FORMAT_VERSION = 1
PAUSE_ENV = "UNIPEFT_CHECKPOINT_PAUSE"
"""For crash tests: ``written:SECONDS`` sleeps after step 1, ``swapped:SECONDS`` after 2."""

_TENSOR_FILES = ("trainable", "optimizer", "rng")
_JSON_FILES = ("optimizer", "config", "state")  # state.json last: the folder is then complete


@dataclass
class Checkpoint:
    """One checkpoint's contents. ``state`` holds the step, the data position and the
    Python/NumPy generator states; ``config`` the :class:`TrainerConfig` as JSON."""

    trainable: dict[str, Tensor]
    optimizer: dict[str, Tensor]
    rng: dict[str, Tensor]
    optimizer_doc: dict[str, Any]
    config: dict[str, Any]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:  # publish() fsyncs every file before the rename
        fh.write(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pause(phase: str) -> None:
    value = os.environ.get(PAUSE_ENV)
    if not value:
        return
    want, _, seconds = value.partition(":")
    if want == phase:
        time.sleep(float(seconds or 0))


def check_writable(output_dir: str | os.PathLike) -> Path:
    """Fail early, before anything is trained or written, if ``output_dir`` cannot be made."""
    out = Path(output_dir)
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise CheckpointError(
            f"output_dir {str(out)!r} cannot be created: {str(probe)!r} is a file, not a "
            "folder. Choose another output_dir"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CheckpointError(
            f"output_dir {str(out)!r} is not writable: no write permission on {str(probe)!r}. "
            "Choose a folder you can write to, or fix its permissions"
        )
    return out


def publish(output_dir: Path, name: str, fill: Callable[[Path], None], pause: bool = False) -> Path:
    """Atomically replace ``output_dir/name/`` by a folder that ``fill`` writes (the module
    docstring gives the protocol). ``pause`` honours :data:`PAUSE_ENV` (crash tests)."""
    recover(output_dir, name)
    tmp, old, final = (output_dir / n for n in (f".{name}.tmp", f".{name}.old", name))
    tmp.mkdir()
    fill(tmp)
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if pause:
        _pause("written")
    if final.exists():
        os.rename(final, old)
        _fsync_dir(output_dir)
    if pause:
        _pause("swapped")
    os.rename(tmp, final)
    _fsync_dir(output_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def write_checkpoint(output_dir: str | os.PathLike, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``output_dir/checkpoint/`` atomically; return that path."""

    def fill(tmp: Path) -> None:
        meta = {"format": FORMAT}
        for name in _TENSOR_FILES:
            _write(tmp / f"{name}.safetensors", save(getattr(ckpt, name), metadata=meta))
        state = {"format": FORMAT, "format_version": FORMAT_VERSION, **ckpt.state}
        docs = {"optimizer": ckpt.optimizer_doc, "config": ckpt.config, "state": state}
        for name in _JSON_FILES:
            _write(tmp / f"{name}.json", json.dumps(docs[name], indent=1).encode("utf-8"))

    return publish(Path(output_dir), CHECKPOINT, fill, pause=True)


def find_checkpoint(output_dir: str | os.PathLike, name: str = CHECKPOINT) -> Path | None:
    """The last complete ``name`` folder in ``output_dir`` (read-only: changes nothing)."""
    out = Path(output_dir)
    for candidate in (name, f".{name}.old"):  # .old is complete iff name/ is missing
        if (out / candidate).is_dir():
            return out / candidate
    return None


def recover(output_dir: str | os.PathLike, name: str = CHECKPOINT) -> Path | None:
    """Tidy up after a kill: keep the last complete ``name`` folder at ``output_dir/name``,
    delete partial or superseded ones. Returns that folder, or None if there is none."""
    out = Path(output_dir)
    found = find_checkpoint(out, name)
    if found is not None and found.name != name:
        os.rename(found, out / name)
        _fsync_dir(out)
        found = out / name
    for leftover in (f".{name}.tmp", f".{name}.old"):
        if (out / leftover).exists():
            shutil.rmtree(out / leftover)
    return found


_Count = Annotated[StrictInt, Field(ge=0)]


class _Rng(BaseModel):
    """Python's and NumPy's generator states, as :func:`rng_to_parts` writes them."""

    model_config = ConfigDict(strict=True, extra="forbid")
    python: list[Any] = Field(min_length=3, max_length=3)
    numpy: list[Any] = Field(min_length=4, max_length=4)

    @field_validator("python")
    @classmethod
    def _python(cls, value: list[Any]) -> list[Any]:
        version, internal, gauss = value
        words = isinstance(internal, list) and all(
            type(i) is int and 0 <= i < 1 << 32 for i in internal
        )
        if type(version) is not int or not words or not (gauss is None or type(gauss) is float):
            raise ValueError("need [version, [integers from 0 to 2**32 - 1], a number or null]")
        return value

    @field_validator("numpy")
    @classmethod
    def _numpy(cls, value: list[Any]) -> list[Any]:
        name, pos, has_gauss, cached = value
        if (
            name != "MT19937"
            or type(pos) is not int
            or not 0 <= pos <= 624
            or type(has_gauss) is not int
            or has_gauss not in (0, 1)
            or type(cached) not in (int, float)
        ):
            raise ValueError('need ["MT19937", position 0 to 624, has_gauss 0 or 1, a number]')
        return value


class _State(BaseModel):
    """``state.json``: where the run stands."""

    model_config = ConfigDict(strict=True, extra="forbid")
    format: StrictStr
    format_version: StrictInt
    step: _Count
    epoch: _Count
    batch_in_epoch: _Count
    epoch_seed: StrictInt
    dataset_len: Annotated[StrictInt, Field(ge=1)]
    trainable_keys: list[StrictStr]
    rng: _Rng


class _Group(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    params: list[_Count]


class _Optimizer(BaseModel):
    """``optimizer.json``: the optimizer's type, param groups and non-tensor state."""

    model_config = ConfigDict(strict=True, extra="forbid")
    type: StrictStr
    param_groups: list[_Group] = Field(min_length=1)
    scalars: dict[
        Annotated[StrictStr, Field(pattern=r"^\d+$")],
        dict[StrictStr, StrictInt | StrictFloat | StrictStr | bool | None],
    ]


_ACCEPTED = {
    "step": "an integer >= 0",
    "epoch": "an integer >= 0",
    "batch_in_epoch": "an integer >= 0",
    "epoch_seed": "an integer",
    "dataset_len": "an integer >= 1",
    "trainable_keys": "a list of strings",
    "format_version": f"an integer up to {FORMAT_VERSION}",
    "params": "a list of parameter indices",
}
_SCHEMAS: dict[str, tuple[type[BaseModel], str]] = {
    "state": (_State, "unipeft checkpoint state"),
    "config": (TrainerConfig, "TrainerConfig"),
    "optimizer": (_Optimizer, "unipeft checkpoint optimizer record"),
}
_OPTIMIZER_KEY = re.compile(r"state/\d+/.+")
_RNG_KEYS = {"torch/cpu": torch.uint8, "numpy/keys": torch.int64}
_RNG_SIZES = {"torch/cpu": torch.get_rng_state().numel(), "numpy/keys": 624}


def _read_doc(folder: Path, name: str) -> dict[str, Any]:
    """``folder/name.json``, checked against its schema."""
    path = folder / f"{name}.json"
    doc = read_json(path, CheckpointError)
    schema, what = _SCHEMAS[name]
    need_object(path, doc, what, CheckpointError)
    if name == "state":
        version = doc.get("format_version")
        if doc.get("format") != FORMAT or type(version) is not int or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{path} is not a unipeft checkpoint of format version up to {FORMAT_VERSION} "
                f"(field format = {doc.get('format')!r}, format_version = {version!r}); "
                "upgrade unipeft or start a new run in another output_dir"
            )
    try:
        valid = schema.model_validate(doc, strict=True)
    except ValidationError as exc:
        raise CheckpointError(schema_message(path, doc, exc, what, _ACCEPTED)) from None
    return valid.model_dump(mode="json") if name == "config" else doc


def _check_tensor_keys(folder: Path, parts: dict[str, Any]) -> None:
    """The optimizer's and generators' tensors are those their readers take."""
    path = folder / "optimizer.safetensors"
    names: dict[str, set[str]] = {}
    for key in parts["optimizer"]:
        if not _OPTIMIZER_KEY.fullmatch(key):
            raise CheckpointError(
                f"{path} holds tensor {key!r}; its tensors are named state/<index>/<name>"
            )
        _, pid, name = key.split("/", 2)
        names.setdefault(pid, set()).add(name)
    for pid, entry in parts["optimizer_doc"]["scalars"].items():
        names.setdefault(pid, set()).update(entry)
    kinds = sorted({tuple(sorted(n)) for n in names.values()})
    if len(kinds) > 1:
        raise CheckpointError(
            f"{path} is incomplete: its parameters carry different state "
            f"({' vs '.join(str(list(k)) for k in kinds)}), and every parameter's state has "
            "the same names. Resume from a complete checkpoint"
        )
    path = folder / "rng.safetensors"
    for key, dtype in _RNG_KEYS.items():
        tensor = parts["rng"].get(key)
        want = (_RNG_SIZES[key],)
        if tensor is None or tensor.dtype != dtype or tuple(tensor.shape) != want:
            got = (
                "nothing" if tensor is None else f"{dtype_name(tensor.dtype)} {tuple(tensor.shape)}"
            )
            raise CheckpointError(
                f"{path}: tensor {key!r} must be a {dtype_name(dtype)} tensor of shape {want}; "
                f"it is {got}"
            )
    for key in parts["rng"]:
        if key not in _RNG_KEYS and not re.fullmatch(r"torch/cuda/\d+", key):
            raise CheckpointError(
                f"{path} holds tensor {key!r}; accepted: torch/cpu, torch/cuda/<i>, numpy/keys"
            )


def read_checkpoint(output_dir: str | os.PathLike) -> Checkpoint | None:
    """Load the last complete checkpoint of ``output_dir`` (None if it has none).

    Only safetensors and JSON are read: nothing from the files is ever executed. Every JSON
    file is checked against its schema (strict types, no unknown field), every tensor file
    for the names its reader takes; a :class:`CheckpointError` names the file and field.
    """
    folder = find_checkpoint(output_dir)
    if folder is None:
        return None
    parts: dict[str, Any] = {}
    # state.json first: it carries the format version the rest is read by
    for name in ("state", "config", "optimizer"):
        parts[f"{name}_doc"] = _read_doc(folder, name)
    for name in _TENSOR_FILES:
        path = folder / f"{name}.safetensors"
        try:
            parts[name] = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path} is missing or unreadable ({exc})") from None
    _check_tensor_keys(folder, parts)
    return Checkpoint(
        trainable=parts["trainable"],
        optimizer=parts["optimizer"],
        rng=parts["rng"],
        optimizer_doc=parts["optimizer_doc"],
        config=parts["config_doc"],
        state=parts["state_doc"],
    )
