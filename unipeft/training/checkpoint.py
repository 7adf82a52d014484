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
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

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


def read_checkpoint(output_dir: str | os.PathLike) -> Checkpoint | None:
    """Load the last complete checkpoint of ``output_dir`` (None if it has none).

    Only safetensors and JSON are read: nothing from the files is ever executed.
    """
    folder = find_checkpoint(output_dir)
    if folder is None:
        return None
    parts: dict[str, Any] = {}
    for name in _TENSOR_FILES:
        path = folder / f"{name}.safetensors"
        try:
            parts[name] = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is missing or unreadable ({exc})") from None
    for name in _JSON_FILES:
        path = folder / f"{name}.json"
        try:
            parts[f"{name}_doc"] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is missing or not valid JSON ({exc})") from None
    state = parts["state_doc"]
    if state.get("format") != FORMAT or state.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder / 'state.json'} is not a unipeft checkpoint of format version up to "
            f"{FORMAT_VERSION}; upgrade unipeft or start a new run in another output_dir"
        )
    return Checkpoint(
        trainable=parts["trainable"],
        optimizer=parts["optimizer"],
        rng=parts["rng"],
        optimizer_doc=parts["optimizer_doc"],
        config=parts["config_doc"],
        state=state,
    )
