"""The README stays an entry page, and no link in it or in docs/ points at a missing file."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s]+)\)")


def broken_links(page: Path) -> list[str]:
    out = []
    for link in LINK.findall(page.read_text()):
        if link.startswith(("http://", "https://", "#", "mailto:")):
            continue
        target = (page.parent / link.split("#")[0]).resolve()
        if not target.exists() or ROOT not in target.parents and target != ROOT:
            out.append(link)
    return out


def test_readme_is_an_entry_page():
    assert (ROOT / "README.md").stat().st_size <= 12 * 1024


def test_every_relative_link_resolves_inside_the_repository():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert {p.name: bad for p in pages if (bad := broken_links(p))} == {}
