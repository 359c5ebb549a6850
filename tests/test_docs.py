"""The documentation a user reads in order: a short README linking every page, links that resolve, and dated
measurements in one place (the results and benchmark pages)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from tests.helpers import REPO

DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]
LINK = re.compile(r"\]\(([^)\s]+)\)")
DATED = ("results.md", "benchmark.md")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_every_relative_link_and_anchor_resolves() -> None:
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def test_the_readme_is_short_and_links_every_page() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 10_500
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(readme)}
    assert [p.name for p in DOCS if p.name not in linked] == []


def test_dated_measurements_live_on_the_results_and_benchmark_pages() -> None:
    dated = [
        f"{page.name}:{n}"
        for page in PAGES
        if page.name not in DATED
        for n, line in enumerate(page.read_text().splitlines(), 1)
        if re.search(r"\b20\d\d-\d\d-\d\d\b", line)
    ]
    assert dated == []


def test_every_test_the_docs_name_exists() -> None:
    named = {m for page in PAGES for m in re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", page.read_text())}
    missing = [
        f"{path}::{test}" if test else path
        for path, test in named
        if not (REPO / path).is_file() or (test and f"def {test}(" not in (REPO / path).read_text())
    ]
    assert missing == []


def test_every_class_path_in_recipes_docs_and_defaults_resolves() -> None:
    """A `class_path` the project writes (experiments, defaults.yaml, scripts' YAML, the docs) names a class that
    imports: moving a module without updating a recipe fails here, not in a user's run."""
    sources = [
        *REPO.glob("experiments/**/*.yaml"),
        *REPO.glob("scripts/**/*.yaml"),
        REPO / "lightning_modules" / "defaults.yaml",
        *PAGES,
    ]
    paths = {
        (source.relative_to(REPO), path)
        for source in sources
        for path in re.findall(r"class_path[\"']?:\s*[\"']?([A-Za-z_][\w.]*\.[A-Z]\w*)", source.read_text())
    }
    assert len(paths) > 30
    broken = []
    for source, path in sorted(paths):
        module, _, name = path.rpartition(".")
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            broken.append(f"{source}: {path} ({err})")
    assert broken == []
