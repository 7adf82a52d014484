"""Every Python example in the README and docs runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]
# plugins.md installs a distribution in its examples; the plugin's own tests cover that code
SKIP = {"docs/plugins.md"}


def _blocks() -> list[tuple[str, int, str]]:
    out = []
    for name in DOCS:
        if name in SKIP:
            continue
        text = (ROOT / name).read_text(encoding="utf-8")
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", text, re.S)):
            out.append((name, i, code))
    return out


@pytest.mark.parametrize(
    ("doc", "index", "code"), [pytest.param(*b, id=f"{b[0]}#{b[1]}") for b in _blocks()]
)
def test_example_runs(doc: str, index: int, code: str) -> None:
    # a fresh interpreter per example: an import the example forgot cannot hide behind one
    # that an earlier test made
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"{doc} example {index} failed:\n{result.stderr[-2000:]}"
