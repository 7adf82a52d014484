"""Every Python example in the README and docs runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
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
    exec(compile(code, f"{doc}#example{index}", "exec"), {"__name__": "__doc_example__"})
