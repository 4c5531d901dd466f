"""The repository's pages cite files that exist, and docs/results holds exactly what its index lists."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
CODE = [p for d in ("runtime", "model", "actors", "storage", "tools", "tests")
        for p in sorted((ROOT / d).rglob("*")) if p.suffix in {".py", ".c", ".h", ".sh"}] + [ROOT / "Makefile"]

# a repository path as pages and comments write it: docs/..., with * and {a,b} allowed
DOCS_PATH = re.compile(r"\bdocs/[\w.*{},/-]*[\w*}/]")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
BARE_RESULT = re.compile(r"`([\w*{},-]+\.(?:txt|json|png))`")


def expand(pattern: str) -> list[str]:
    """``a_{x,y}.txt`` -> ``a_x.txt``, ``a_y.txt`` (every brace, as the shell does)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    return [out for alt in m.group(1).split(",")
            for out in expand(pattern[:m.start()] + alt + pattern[m.end():])]


def matches(base: Path, pattern: str) -> bool:
    return all(any(base.glob(p)) if "*" in p else (base / p).exists() for p in expand(pattern))


def cited_docs_paths(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [m.group(0).rstrip("/") for m in DOCS_PATH.finditer(text)]


@pytest.mark.parametrize("path", PAGES + CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_docs_path_a_file_cites_exists(path):
    if path == Path(__file__).resolve():
        return
    missing = [p for p in cited_docs_paths(path) if not matches(ROOT, p)]
    assert not missing, f"{path.relative_to(ROOT)} cites paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_in_a_page_resolves(page):
    links = [m.group(1) for m in LINK.finditer(page.read_text(encoding="utf-8"))]
    missing = [link for link in links if "://" not in link and not (page.parent / link).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to paths that do not exist: {missing}"


def test_every_result_the_readme_names_without_its_folder_exists():
    names = BARE_RESULT.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    in_results = [n for n in names if matches(RESULTS, n)]
    # the README names a few files that are not results (a store's config.json, the bench's quality.json,
    # a GPU run's correctness.json): each of those lives under some other folder
    elsewhere = {"config.json", "quality.json", "correctness.json"}
    assert sorted(set(names) - set(in_results)) == sorted(elsewhere & set(names))


def index_entries() -> list[str]:
    """The backticked names in the first column of docs/results/README.md's tables."""
    rows = [line for line in (RESULTS / "README.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| `")]
    return [name for row in rows for name in re.findall(r"`([^`]+)`", row.split(" | ")[0])]


def test_the_results_index_lists_files_that_exist():
    missing = [e for e in index_entries() if not matches(RESULTS, e)]
    assert not missing, f"docs/results/README.md lists files that do not exist: {missing}"


def test_every_file_in_docs_results_is_in_its_index():
    listed: set[Path] = set()
    for entry in index_entries():
        for name in expand(entry):
            path = RESULTS / name
            listed.update(path.rglob("*") if path.is_dir() else [path])
    files = {p for p in RESULTS.rglob("*") if p.is_file() and p.name != "README.md"}
    unlisted = sorted(str(p.relative_to(RESULTS)) for p in files - listed)
    assert not unlisted, f"files in docs/results that its README does not list (list them or remove them): {unlisted}"
