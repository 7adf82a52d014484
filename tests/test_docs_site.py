"""The documentation site builds with ``mkdocs build --strict`` and has a page per method."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import unipeft

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    return out


def test_site_builds_with_the_hand_written_pages(site: Path) -> None:
    assert (site / "index.html").is_file()
    for page in ("taxonomy", "plugins", "quickstart/text", "quickstart/vit", "quickstart/clip"):
        assert (site / page / "index.html").is_file(), page


def test_a_page_per_registered_method(site: Path) -> None:
    methods = unipeft.list_methods()
    ids = {m.id for m in methods}
    assert "lora" in ids
    taxonomy = (site / "taxonomy" / "index.html").read_text(encoding="utf-8")
    for m in methods:
        page = site / "taxonomy" / m.id / "index.html"
        assert page.is_file(), f"no generated page for method {m.id!r}"
        html = page.read_text(encoding="utf-8")
        assert m.family in html
        for name in m.config.model_fields:
            assert f"<code>{name}</code>" in html, f"{m.id}: field {name!r} missing"
        # taxonomy.md's generated table and family list link every method's page (the
        # navigation links it too, without <code>)
        link = f'<a href="{m.id}/"><code>{m.id}</code></a>'
        assert taxonomy.count(link) == 2, f"taxonomy.md does not link {m.id!r}"


def test_lora_page_shows_its_fields_and_paper(site: Path) -> None:
    html = (site / "taxonomy" / "lora" / "index.html").read_text(encoding="utf-8")
    lora = unipeft.get_method("lora")
    assert lora.config.model_fields["r"].description in html
    assert "https://arxiv.org/abs/2106.09685" in html
