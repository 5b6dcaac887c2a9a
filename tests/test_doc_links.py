"""Every relative link in the project's Markdown files points at a file that exists (and, for
``#anchors`` into Markdown, at a heading that exists)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.fixtures.live_server import REPO_ROOT

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
SKIP_DIRS = {".venv", ".git", "node_modules", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def markdown_files() -> list[Path]:
    return sorted(
        p
        for p in REPO_ROOT.rglob("*.md")
        if not SKIP_DIRS & set(p.relative_to(REPO_ROOT).parts)
        and not p.relative_to(REPO_ROOT).parts[0].startswith(".")
    )


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for match in LINK.finditer(doc.read_text()):
        target = match.group(1) or match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (not checked offline) or an anchor in this page
        path_part, _, anchor = target.partition("#")
        resolved = (doc.parent / path_part).resolve()
        if not resolved.exists() or (
            anchor and resolved.suffix == ".md" and anchor not in anchors(resolved)
        ):
            broken.append(target)
    assert not broken, f"{doc.relative_to(REPO_ROOT)} links to missing {broken}"
