"""``python -m unipeft`` is the ``unipeft`` console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import unipeft


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(command), capture_output=True, text=True, timeout=300, env=None, check=False
    )


def test_python_m_unipeft_runs_the_cli() -> None:
    version = _run(sys.executable, "-m", "unipeft", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"unipeft {unipeft.__version__}"
    listed = _run(sys.executable, "-m", "unipeft", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {m["id"] for m in json.loads(listed.stdout)} == {m.id for m in unipeft.list_methods()}
    wrong = _run(sys.executable, "-m", "unipeft", "inspect", "tiny:nope")
    assert wrong.returncode == 2 and "unknown tiny backbone 'nope'" in wrong.stderr


def test_python_m_unipeft_matches_the_console_script() -> None:
    script = Path(sys.executable).with_name("unipeft")
    if not script.is_file():
        pytest.skip("the unipeft console script is not installed next to this interpreter")
    for args in (["--version"], ["list", "--json"]):
        via_module = _run(sys.executable, "-m", "unipeft", *args)
        via_script = _run(str(script), *args)
        assert via_module.returncode == via_script.returncode == 0
        assert via_module.stdout == via_script.stdout
