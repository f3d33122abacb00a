"""The reference in docs/ builds as a site with `mkdocs build --strict` (a broken link, a missing
anchor or a page left out of the nav fails), the README's links lead somewhere, and the layout
page's tree and arrows are the package's as it is."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MKDOCS = Path(sys.executable).with_name("mkdocs")


def _build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MKDOCS), "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_docs_build_strictly(tmp_path: Path) -> None:
    result = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "layout" / "index.html").is_file()


def test_a_broken_link_or_a_page_left_out_of_the_nav_fails_the_build(tmp_path: Path) -> None:
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    (tmp_path / "docs" / "orphan.md").write_text("# Not in the nav\n")
    result = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "orphan.md" in result.stderr, result.stderr

    (tmp_path / "docs" / "orphan.md").unlink()
    page = tmp_path / "docs" / "cli.md"
    page.write_text(page.read_text() + "\nSee [nowhere](no-such-page.md).\n")
    result = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stderr, result.stderr


def test_the_readme_links_lead_to_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert "docs/cli.md" in local and "docs/layout.md" in local, local
    missing = [t for t in local if not (ROOT / t).exists()]
    assert missing == [], missing


def _fenced_after(page: str, heading: str) -> str:
    text = (DOCS / page).read_text()
    section = text.split(f"\n## {heading}\n", 1)[1]
    match = re.search(r"```text\n(.*?)```", section, re.S)
    assert match, f"{page}: no ```text block under '## {heading}'"
    return match.group(1)


def _documented_tree() -> set[str]:
    """The paths of the layout page's tree: two spaces of indent per folder level."""
    paths: set[str] = set()
    stack: list[str] = []
    for line in _fenced_after("layout.md", "The tree").splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        del stack[depth:]
        stack.append(name.rstrip("/"))
        paths.add("/".join(stack) + ("/" if name.endswith("/") else ""))
    return paths


def _package_tree() -> set[str]:
    """Every module and folder of the package, a folder's contents left out where the page
    names the folder only (the migrations' versions, the page's templates and static files)."""
    package = ROOT / "pixelmill"
    whole = {
        "pixelmill/db/migrations",
        "pixelmill/dashboard/templates",
        "pixelmill/dashboard/static",
    }
    paths = {"pixelmill/"}
    for path in sorted(package.rglob("*")):
        rel = path.relative_to(ROOT).as_posix()
        if "__pycache__" in rel or any(rel.startswith(w + "/") for w in whole):
            continue
        if path.is_dir():
            paths.add(rel + "/")
        elif path.suffix == ".py":
            paths.add(rel)
    return paths


def test_the_layout_page_shows_every_module_of_the_package() -> None:
    documented, present = _documented_tree(), _package_tree()
    assert "pixelmill/cli/run.py" in present and "pixelmill/db/migrations/" in present
    assert sorted(present - documented) == [], "in the package, not on docs/layout.md"
    assert sorted(documented - present) == [], "on docs/layout.md, not in the package"


def _part(module: str, core: set[str]) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "pixelmill"
    return "core" if parts[1] in core else parts[1]


def test_the_layout_page_shows_the_arrows_as_they_are() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = (c for c in config["contracts"] if c["type"] == "layers")
    core = {name.strip() for name in layers["layers"][-1].split(":")}
    graph = grimp.build_graph("pixelmill")
    actual: dict[str, set[str]] = {}
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            a, b = _part(module, core), _part(imported, core)
            if a != b:
                actual.setdefault(a, set()).add(b)
    documented: dict[str, set[str]] = {}
    for line in _fenced_after("layout.md", "The arrows, as they are").splitlines():
        if line.strip():
            source, _, targets = line.partition("->")
            documented[source.strip()] = {t.strip() for t in targets.split(",")}
    assert "cli" in actual and "core" in actual["db"], actual
    assert documented == actual
