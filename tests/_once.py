"""A fixture's expensive product made once per test session, even across xdist workers.

pytest-xdist spreads the tests of one file over its workers, and each worker sets up the
file's module fixtures for itself: a fixture that launches processes (the distributed tests)
would launch them once per worker. :func:`made_once` makes the folder once, in the temporary
root the workers share, under a file lock; a worker that comes second waits for the first
and reads the same folder. If the first one fails, the next one tries again (and fails with
its own error)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock


def made_once(factory: pytest.TempPathFactory, name: str, produce: Callable[[Path], None]) -> Path:
    """``folder`` after ``produce(folder)`` ran in it, once per session."""
    root = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # what every worker's basetemp sits in
    folder = root / f"once-{name}"
    done = folder / ".done"
    with FileLock(str(root / f"once-{name}.lock")):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            produce(folder)
            done.touch()
    return folder
