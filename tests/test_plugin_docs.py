"""docs/plugins.md runs as written, with its plugins installed the way pip would.

The page has four kinds of code blocks:

- a Python block whose docstring opens with ``name:`` (a module name) is a plugin module,
  written to ``name.py``;
- a TOML block declaring ``[project.entry-points.unipeft]`` for one of those modules becomes
  the installed distribution's metadata (a ``.dist-info`` folder next to the module), which
  is all ``importlib.metadata`` reads;
- a Python block marked ``<!-- excerpt: PATH -->`` shows code of a file of this repository:
  its lines must appear in that file, in order;
- every other Python block is a script, run in a fresh interpreter with the plugins on the
  path and ``UNIPEFT_STRICT_PLUGINS=1``.

The conformance kit then runs on the page's methods and its tiny backbone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"
FENCE = re.compile(
    r"(?:<!-- excerpt: (?P<excerpt>\S+) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S
)
MODULE = re.compile(r'"""(?P<name>[a-z_][a-z0-9_]*): ')


@dataclass(frozen=True)
class Block:
    index: int
    lang: str
    code: str
    excerpt: str | None

    @property
    def module(self) -> str | None:
        m = MODULE.match(self.code) if self.lang == "python" and not self.excerpt else None
        return m.group("name") if m else None


def _blocks() -> list[Block]:
    text = DOC.read_text(encoding="utf-8")
    return [
        Block(i, m.group("lang"), m.group("code"), m.group("excerpt"))
        for i, m in enumerate(FENCE.finditer(text))
    ]


BLOCKS = _blocks()
MODULES = {b.module: b.code for b in BLOCKS if b.module}
EXCERPTS = [b for b in BLOCKS if b.lang == "python" and b.excerpt]
SCRIPTS = [b for b in BLOCKS if b.lang == "python" and not b.excerpt and not b.module]


def _distributions() -> dict[str, tuple[str, str]]:
    """Distribution -> (entry point name, module), for the page's own plugin modules."""
    out = {}
    for block in BLOCKS:
        if block.lang != "toml" or "[project.entry-points.unipeft]" not in block.code:
            continue
        project = tomllib.loads(block.code)["project"]
        for name, module in project["entry-points"]["unipeft"].items():
            if module in MODULES:
                out[project["name"]] = (name, module)
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder on ``sys.path`` holding the page's plugins as installed distributions."""
    folder = tmp_path_factory.mktemp("site")
    for module, code in MODULES.items():
        (folder / f"{module}.py").write_text(code, encoding="utf-8")
    for dist, (name, module) in _distributions().items():
        info = folder / f"{re.sub(r'[-.]+', '_', dist)}-0.1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
        (info / "entry_points.txt").write_text(f"[unipeft]\n{name} = {module}\n")
    return folder


def _env(site: Path) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "PYTHONPATH": path, "UNIPEFT_STRICT_PLUGINS": "1"}


def test_the_page_defines_its_plugins() -> None:
    assert set(MODULES) == {"unipeft_tiedlora", "unipeft_normtune", "unipeft_toymap"}
    assert set(_distributions()) == {"unipeft-tiedlora", "unipeft-normtune", "unipeft-toymap"}
    assert len(EXCERPTS) >= 5 and len(SCRIPTS) >= 6


@pytest.mark.parametrize("block", EXCERPTS, ids=lambda b: f"block{b.index}")
def test_excerpt_matches_its_file(block: Block) -> None:
    lines = iter((ROOT / block.excerpt).read_text(encoding="utf-8").splitlines())
    for wanted in (line for line in block.code.splitlines() if line.strip()):
        assert any(line == wanted for line in lines), (
            f"docs/plugins.md block {block.index}: {wanted!r} is not in {block.excerpt} "
            "(or not in this order)"
        )


@pytest.mark.parametrize("block", SCRIPTS, ids=lambda b: f"block{b.index}")
def test_example_runs(block: Block, site: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", block.code],
        capture_output=True,
        text=True,
        env=_env(site),
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, f"block {block.index} failed:\n{result.stderr[-3000:]}"
    assert "Warning" not in result.stderr, result.stderr[-3000:]


PYTEST = (sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q")


def test_the_kit_passes_on_the_pages_plugins(site: Path, tmp_path: Path) -> None:
    """The page's methods on its tiny model, and on a fused (GPT-2) and a bias-less-norm
    (Llama) backbone; prompt tuning on the page's token sequence."""
    runs = [
        ("tied_lora,norm_tune,prompt_tuning", "toy-transformer"),
        ("tied_lora,norm_tune", "gpt2,llama"),
    ]
    for methods, backbones in runs:
        result = subprocess.run(
            [*PYTEST, "--unipeft-conformance", methods, "--unipeft-backbones", backbones],
            capture_output=True,
            text=True,
            env=_env(site),
            cwd=tmp_path,
            timeout=900,
        )
        assert result.returncode == 0, result.stdout[-4000:]
        assert " passed" in result.stdout and "skipped" not in result.stdout
    assert not (tmp_path / ".hypothesis").exists()
