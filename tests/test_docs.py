"""Every Python example in the README and docs runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _snippets import RUNNER

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]
# plugins.md installs a distribution in its examples; the plugin's own tests cover that code
SKIP = {"docs/plugins.md"}
# An example that needs a launcher and an engine this process has not (DeepSpeed, several
# ranks) starts with this line and names the test that runs its code: it is compiled here.
LAUNCHED = "# launched with "


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
    if code.startswith(LAUNCHED):  # needs a launcher and its engine: compiled, not run here
        compile(code, f"{doc} example {index}", "exec")
        assert "\n# runs in: tests/" in code, f"{doc} example {index} names no test that runs it"
        return
    # a process of its own per example (forked from one that paid the imports): an import
    # the example forgot cannot hide behind one that an earlier test made
    result = RUNNER.run(code)
    assert result.returncode == 0, f"{doc} example {index} failed:\n{result.output[-2000:]}"


def test_examples_run_isolated() -> None:
    """The runner the examples use: a forgotten import fails, and nothing one example
    changes reaches the next."""
    forgot = RUNNER.run("print(unipeft.__version__)")
    assert forgot.returncode == 1 and "NameError" in forgot.output
    assert RUNNER.run("import builtins; builtins.LEAK = 1").returncode == 0
    later = RUNNER.run("import builtins; assert not hasattr(builtins, 'LEAK')")
    assert later.returncode == 0, later.output
    assert RUNNER.run("raise SystemExit(3)").returncode == 3
