"""DeltaModel.save() killed at any instant leaves a folder that loads the old adapters or the
new ones, never neither; the next save removes what a killed save left behind. The same holds
for the PEFT exporter (``unipeft.interop.peft.save``), which writes through the same code.

The save runs in a forked child that is killed: at each file operation of the save in turn
(the child exits on the spot with ``os._exit``, as a kill would: no clean-up runs), and at
random instants while it saves in a loop (SIGKILL from the parent).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import unipeft
from unipeft.features import saving
from unipeft.features.interop import peft as interop
from unipeft.testing.backbones import BACKBONES

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

# the file operations of a save, as the saving module calls them
OPERATIONS = ("save_file", "_sha256", "_fsync", "_settle")


def _model(seed: int) -> unipeft.DeltaModel:
    model = unipeft.apply(BACKBONES["bert"].make(), "lora", r=2, targets=["attn.q", "attn.v"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.deltas.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _tensors(model: unipeft.DeltaModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.deltas.state_dict().items()}


def _which(directory: Path, old: dict, new: dict) -> str:
    loaded = _tensors(unipeft.load(BACKBONES["bert"].make(), str(directory)))
    for label, expected in (("old", old), ("new", new)):
        if loaded.keys() == expected.keys() and all(
            torch.equal(loaded[k], v) for k, v in expected.items()
        ):
            return label
    raise AssertionError("the folder holds neither the old adapters nor the new ones")


def _child(fn) -> int:  # type: ignore[no-untyped-def]
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            fn()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


def _operations_of(write: Callable[[], None]) -> int:
    """How many file operations ``write()`` (a save or an export over an earlier one) makes."""
    count = [0]
    originals = {name: getattr(saving, name) for name in OPERATIONS}
    replace = os.replace

    def counted(fn):  # type: ignore[no-untyped-def]
        def call(*a, **k):  # type: ignore[no-untyped-def]
            count[0] += 1
            return fn(*a, **k)

        return call

    try:
        for name, fn in originals.items():
            setattr(saving, name, counted(fn))
        os.replace = counted(replace)
        write()
    finally:
        for name, fn in originals.items():
            setattr(saving, name, fn)
        os.replace = replace
    return count[0]


def test_a_kill_at_every_file_operation(tmp_path: Path) -> None:
    old_model, new_model = _model(0), _model(1)
    old, new = _tensors(old_model), _tensors(new_model)
    old_model.save(str(tmp_path / "count"))
    steps = _operations_of(lambda: new_model.save(str(tmp_path / "count")))
    assert steps >= 8  # settle, write, checksum, three fsyncs, two renames and their fsyncs
    seen = []
    for k in range(1, steps + 2):  # k = steps + 1: the save runs to its end
        folder = tmp_path / f"kill-{k}"
        old_model.save(str(folder))

        def save_and_die(k: int = k, folder: Path = folder) -> None:
            count = [0]

            def dying(fn):  # type: ignore[no-untyped-def]
                def call(*a, **kw):  # type: ignore[no-untyped-def]
                    count[0] += 1
                    if count[0] == k:
                        os._exit(9)  # no finally, no atexit, no temporary-folder clean-up
                    return fn(*a, **kw)

                return call

            for name in OPERATIONS:
                setattr(saving, name, dying(getattr(saving, name)))
            os.replace = dying(os.replace)
            new_model.save(str(folder))

        status = _child(save_and_die)
        killed = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 9
        assert killed == (k <= steps), (k, status)
        seen.append(_which(folder, old, new))
        # the next save completes and leaves no temporary folder behind
        new_model.save(str(folder))
        assert _which(folder, old, new) == "new"
        assert sorted(p.name for p in folder.iterdir()) == [
            "unipeft_adapters.json",
            "unipeft_adapters.safetensors",
        ]
    assert seen[0] == "old" and seen[-1] == "new"
    assert "old" in seen and "new" in seen


def test_a_kill_between_the_renames_loads_the_new_adapters(tmp_path: Path) -> None:
    old_model, new_model = _model(0), _model(1)
    old, new = _tensors(old_model), _tensors(new_model)
    old_model.save(str(tmp_path))

    def die_after_first_rename() -> None:
        replace = os.replace

        def once(src, dst):  # type: ignore[no-untyped-def]
            replace(src, dst)
            os._exit(9)

        os.replace = once
        new_model.save(str(tmp_path))

    _child(die_after_first_rename)
    assert len(list(tmp_path.glob(".unipeft-tmp-*"))) == 1  # the new config waits there
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert _which(tmp_path, old, new) == "new"
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files  # read only


@pytest.mark.parametrize("seed", range(3))
def test_kills_at_random_instants(tmp_path: Path, seed: int) -> None:
    old_model, new_model = _model(0), _model(1)
    old, new = _tensors(old_model), _tensors(new_model)
    rng = random.Random(seed)
    outcomes = []
    for i in range(8):
        folder = tmp_path / f"run-{i}"
        old_model.save(str(folder))
        pid = os.fork()
        if pid == 0:
            try:
                while True:
                    new_model.save(str(folder))
                    old_model.save(str(folder))
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        outcomes.append(_which(folder, old, new))
    assert set(outcomes) <= {"old", "new"}


# ----------------------------------------------------------------------------- the PEFT exporter

PEFT_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def _peft_which(directory: Path, old: dict, new: dict) -> str:
    loaded = _tensors(interop.load(BACKBONES["bert"].make(), directory))
    for label, expected in (("old", old), ("new", new)):
        if loaded.keys() == expected.keys() and all(
            torch.equal(loaded[k], v) for k, v in expected.items()
        ):
            return label
    raise AssertionError("the folder holds neither the old adapter nor the new one")


def _peft_pair(tmp_path: Path) -> tuple[unipeft.DeltaModel, unipeft.DeltaModel, dict, dict]:
    """Two models and the tensors each one's export loads as."""
    old_model, new_model = _model(0), _model(1)
    expected = []
    for label, model in (("old", old_model), ("new", new_model)):
        interop.save(model, tmp_path / f"ref-{label}")
        expected.append(_tensors(interop.load(BACKBONES["bert"].make(), tmp_path / f"ref-{label}")))
    return old_model, new_model, expected[0], expected[1]


def test_a_peft_export_killed_at_every_file_operation(tmp_path: Path) -> None:
    old_model, new_model, old, new = _peft_pair(tmp_path)
    interop.save(old_model, tmp_path / "count")
    steps = _operations_of(lambda: interop.save(new_model, tmp_path / "count"))
    assert steps >= 8  # settle, write, checksum, four fsyncs, two renames and their fsyncs
    seen = []
    for k in range(1, steps + 2):  # k = steps + 1: the export runs to its end
        folder = tmp_path / f"kill-{k}"
        interop.save(old_model, folder)
        (folder / "README.md").write_text("the user's own file")

        def export_and_die(k: int = k, folder: Path = folder) -> None:
            count = [0]

            def dying(fn):  # type: ignore[no-untyped-def]
                def call(*a, **kw):  # type: ignore[no-untyped-def]
                    count[0] += 1
                    if count[0] == k:
                        os._exit(9)  # no finally, no atexit, no temporary-folder clean-up
                    return fn(*a, **kw)

                return call

            for name in OPERATIONS:
                setattr(saving, name, dying(getattr(saving, name)))
            os.replace = dying(os.replace)
            interop.save(new_model, folder)

        status = _child(export_and_die)
        killed = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 9
        assert killed == (k <= steps), (k, status)
        seen.append(_peft_which(folder, old, new))
        # the next export completes and leaves no temporary folder behind
        interop.save(new_model, folder)
        assert _peft_which(folder, old, new) == "new"
        assert sorted(p.name for p in folder.iterdir()) == sorted([*PEFT_FILES, "README.md"])
        assert (folder / "README.md").read_text() == "the user's own file"
    assert seen[0] == "old" and seen[-1] == "new"
    assert "old" in seen and "new" in seen


def test_a_peft_export_killed_between_the_renames_loads_the_new_adapter(tmp_path: Path) -> None:
    old_model, new_model, old, new = _peft_pair(tmp_path)
    folder = tmp_path / "peft"
    interop.save(old_model, folder)

    def die_after_first_rename() -> None:
        replace = os.replace

        def once(src, dst):  # type: ignore[no-untyped-def]
            replace(src, dst)
            os._exit(9)

        os.replace = once
        interop.save(new_model, folder)

    _child(die_after_first_rename)
    assert len(list(folder.glob(".unipeft-peft-*"))) == 1  # the new config waits there
    files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert _peft_which(folder, old, new) == "new"
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files  # read only
    interop.save(old_model, folder)  # the next export settles, then writes
    assert _peft_which(folder, old, new) == "old"
    assert sorted(p.name for p in folder.iterdir()) == PEFT_FILES


@pytest.mark.parametrize("seed", range(3))
def test_peft_exports_killed_at_random_instants(tmp_path: Path, seed: int) -> None:
    old_model, new_model, old, new = _peft_pair(tmp_path)
    rng = random.Random(100 + seed)
    outcomes = []
    for i in range(8):
        folder = tmp_path / f"run-{i}"
        interop.save(old_model, folder)
        pid = os.fork()
        if pid == 0:
            try:
                while True:
                    interop.save(new_model, folder)
                    interop.save(old_model, folder)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        outcomes.append(_peft_which(folder, old, new))
        interop.save(new_model, folder)  # the next export removes what the killed one left
        assert sorted(p.name for p in folder.iterdir()) == PEFT_FILES
    assert set(outcomes) <= {"old", "new"}
