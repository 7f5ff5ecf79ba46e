"""The README stays short and the documentation site builds: every page in mkdocs.yml's nav
exists, every link from the README into docs/ resolves, and `mkdocs build --strict` passes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MKDOCS = ROOT / "mkdocs.yml"
DOCS_LINK = re.compile(r"\]\((docs/[^)\s#]+)(?:#[^)\s]*)?\)")


def nav_pages(entries) -> list[str]:
    """Every page path of a MkDocs nav (entries may nest sections)."""
    pages: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            pages.append(entry)
        elif isinstance(entry, dict):
            for value in entry.values():
                if isinstance(value, str):
                    pages.append(value)
                else:
                    pages.extend(nav_pages(value))
    return pages


def config() -> dict:
    return yaml.safe_load(MKDOCS.read_text())


def test_readme_is_at_most_300_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; the guides belong in docs/"


def test_every_nav_page_exists():
    cfg = config()
    assert cfg["theme"]["name"] == "material"
    docs_dir = ROOT / cfg["docs_dir"]
    pages = nav_pages(cfg["nav"])
    assert "index.md" in pages and "security-model.md" in pages and "layout.md" in pages
    missing = [page for page in pages if not (docs_dir / page).is_file()]
    assert missing == [], f"pages in mkdocs.yml's nav without a file in docs/: {missing}"


def test_readme_links_into_docs_resolve():
    links = DOCS_LINK.findall(README.read_text())
    assert links, "README.md links to no page of docs/"
    broken = [link for link in links if not (ROOT / link).is_file()]
    assert broken == [], f"README.md links to missing files: {broken}"
    linked = {link.removeprefix("docs/") for link in links}
    unlinked = [page for page in nav_pages(config()["nav"]) if page not in linked]
    assert unlinked == [], f"nav pages the README does not point to: {unlinked}"


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
         "--config-file", str(MKDOCS), "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    for page in nav_pages(config()["nav"]):
        assert (site / page).with_suffix(".html").is_file(), f"{page} was not built"
    assert (site / "screenshots" / "edge-releases-list.png").is_file()
