"""The tables generated from the registry (README's methods, docs/methods.md's overview,
docs/interop.md's PEFT types) are current: ``python docs/hooks.py`` would change nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")

import unipeft

ROOT = Path(__file__).resolve().parents[1]


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HOOKS = _hooks()


@pytest.mark.parametrize("page", ["README.md", "docs/methods.md", "docs/interop.md"])
def test_generated_blocks_are_current(page: str) -> None:
    text = (ROOT / page).read_text(encoding="utf-8")
    assert "<!-- unipeft:" in text
    assert HOOKS.refresh(text) == text, f"{page} is stale: run python docs/hooks.py"


def test_every_method_is_in_the_readme_and_every_codec_in_interop() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for method in unipeft.list_methods():
        assert f"| `{method.id}`" in readme, method.id
    interop = (ROOT / "docs" / "interop.md").read_text(encoding="utf-8")
    for method, peft_type in HOOKS.peft_types().items():
        assert f"| {peft_type} | `{method}` |" in interop


def test_at_least_27_methods_are_registered() -> None:
    assert len(unipeft.list_methods()) >= 27
