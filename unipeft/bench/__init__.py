"""Benchmarks: the survey's experiments (``unipeft bench latency|memory|rank-sweep``).

Each experiment returns JSON-ready rows and writes ``<name>.json`` and ``<name>.png`` into
an output folder; the numbers are measured on the machine that runs them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temp file + rename), so a kill leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(directory: Path) -> Path:
    """Create ``directory`` if needed and prove a file can be written there."""
    from ..contract.errors import UnipeftError

    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise UnipeftError(
            f"output folder {directory} is not writable ({exc.strerror}); choose another"
        ) from None
    return directory
