"""Tiny backbones come from the registry: one for every built-in structure map, the CLI's
``tiny:<name>`` builds any registered one, and only the kit imports ``unipeft.testing``."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import pytest

import unipeft
from unipeft.maps.builtin import BUILTIN_MAPS
from unipeft.runtime.registry import registry
from unipeft.runtime.targets import pick_map

PACKAGE = Path(unipeft.__file__).parent

# The generic map matches every model, at the lowest priority, so it is picked only for a
# model that no map with roles describes. Such a model has no roles, and every method's
# default targets are roles: the kit would skip every case on it. The generic map's sites
# are exercised on every tiny backbone instead (module-name targets, tests/test_maps.py).
WITHOUT_TINY_MODEL = {"generic": "matches anything; no roles, so the kit would skip every case"}


@cache
def _picked() -> dict[str, list[str]]:
    """Map name -> the tiny backbones it is picked for."""
    reg = registry()
    out: dict[str, list[str]] = {}
    for name, backbone in reg.tiny_backbones.items():
        model = backbone.make()
        smap = pick_map(model, reg.sorted_maps())
        assert smap.matches(model)
        out.setdefault(smap.name, []).append(name)
    return out


@pytest.mark.parametrize("smap", BUILTIN_MAPS, ids=lambda m: m.name)
def test_every_builtin_map_has_a_tiny_backbone(smap) -> None:
    if smap.name in WITHOUT_TINY_MODEL:
        assert smap.name not in _picked()  # no tiny model falls through to it
        pytest.skip(WITHOUT_TINY_MODEL[smap.name])
    assert _picked().get(smap.name), (
        f"no registered tiny backbone is matched by structure map {smap.name!r} (maps picked: "
        f"{_picked()}); register one in unipeft/maps/tiny.py"
    )


def test_builtin_tiny_models_are_seeded_copies() -> None:
    bb = registry().tiny_backbone("bert")
    a, b = bb.make(), bb.make()
    assert a is not b and not a.training
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(a.parameters(), b.parameters()))
    assert bb.run(a, bb.sample(3)).equal(bb.run(b, bb.sample(3)))


def _imports_testing(path: Path) -> list[int]:
    """Lines of ``path`` that import ``unipeft.testing`` (absolute or relative)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rpartition(".")[0] if path.name != "__init__.py" else module
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join([*base, node.module or ""]) if node.level else node.module or ""
            targets = [target.rstrip("."), *(f"{target}.{a.name}" for a in node.names)]
        if any(t == "unipeft.testing" or t.startswith("unipeft.testing.") for t in targets):
            lines.append(node.lineno)
    return lines


def test_only_the_kit_imports_unipeft_testing() -> None:
    offenders = {
        str(path.relative_to(PACKAGE.parent)): lines
        for path in sorted(PACKAGE.rglob("*.py"))
        if "testing" not in path.relative_to(PACKAGE).parts[:1]
        and (lines := _imports_testing(path))
    }
    assert not offenders, f"import unipeft.testing outside the kit: {offenders}"
    assert _imports_testing(PACKAGE / "testing" / "suite.py")  # the check can fail


TOY = """
    import torch
    from torch import nn

    import unipeft
    from unipeft.maps.tiny import TinyBackbone


    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))


    @unipeft.hookimpl
    def register_tiny_backbones(register):
        register(
            TinyBackbone(
                "plugin-mlp",
                "vectors",
                Mlp,
                lambda gen: {"x": torch.randn(2, 4, generator=gen)},
                lambda model, inputs: [model(inputs["x"])],
            )
        )
"""


def test_cli_builds_a_plugins_tiny_backbone(tmp_path: Path) -> None:
    (tmp_path / "unipeft_mlp.py").write_text(textwrap.dedent(TOY))
    info = tmp_path / "unipeft_mlp-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: unipeft-mlp\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[unipeft]\nmlp = unipeft_mlp\n")
    env = {"PYTHONPATH": str(tmp_path), "UNIPEFT_STRICT_PLUGINS": "1", "COLUMNS": "200"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "unipeft", *args],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            cwd=tmp_path,
            timeout=300,
        )

    shown = cli("inspect", "tiny:plugin-mlp", "--json")
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["parameters"] == (4 * 8 + 8) + (8 * 4 + 4)
    assert "unipeft-mlp" in summary["source"]
    unknown = cli("inspect", "tiny:nope")
    assert unknown.returncode == 2
    assert "plugin-mlp" in unknown.stderr and "bert" in unknown.stderr
