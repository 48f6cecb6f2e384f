"""The documents hold together: every relative link in README.md, docs/*.md, benchmarks/README.md and
examples/README.md points to a file that exists (and, with a #fragment into a Markdown file, to a
heading it has), and the README stays a short page for users."""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
        ROOT / "examples" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (except - and _), spaces -> '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def links(path: Path):
    text = FENCE.sub("", path.read_text())
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        yield target


def test_every_relative_link_resolves():
    broken = []
    for doc in DOCS:
        assert doc.is_file(), f"{doc} is missing"
        for target in links(doc):
            file_part, _, fragment = target.partition("#")
            dest = (doc.parent / unquote(file_part)).resolve() if file_part else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_checker_catches_a_broken_link(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("# Title here\n[ok](#title-here) [bad](missing.md) [bad anchor](#nope)\n```\n[x](in-code.md)\n```\n")
    assert list(links(doc)) == ["#title-here", "missing.md", "#nope"]
    assert anchors(doc) == {"title-here"}
    assert slug("Tenant isolation (`benchmarks/isolation.py`)") == "tenant-isolation-benchmarksisolationpy"


def test_readme_is_a_short_page_for_users():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for section in ("## Quick start", "make serve", "make test", "## Architecture", "## Headline numbers",
                    "## Not finished"):
        assert section in text
