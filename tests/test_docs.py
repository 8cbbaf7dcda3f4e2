"""README is the front door: its paper-to-code anchors name real definitions, its links (and the
docs pages') lead to files and headings that exist, and it stays short enough to read in one sitting."""
import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


def paper_map() -> list[tuple[str, str]]:
    """(file, dotted name) of every `file.py:name` anchor in README's paper-to-code map."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## From the paper to the code", 1)[1]
    return re.findall(r"`([\w/]+\.py):([\w.]+)`", section)


def defined(file: str, dotted: str) -> bool:
    """Whether `dotted` (a function, a class, or a method as Class.method) is defined in `file`."""
    body = ast.parse((ROOT / file).read_text()).body
    for part in dotted.split("."):
        found = [n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part]
        if not found:
            return False
        body = found[0].body
    return True


def test_the_paper_to_code_map_covers_the_paper_and_every_anchor_exists():
    anchors = paper_map()
    assert len(anchors) >= 15
    missing = [f"{f}:{d}" for f, d in anchors if not defined(f, d)]
    assert not missing, f"README's paper-to-code map names definitions that do not exist: {missing}"
    text = (ROOT / "README.md").read_text().split("## From the paper to the code", 1)[1]
    for step in ("Eq. 6", "Eq. 8", "Algorithm 1", "FedIT", "FLoRA", "local training", "server step"):
        assert step in text


def test_an_anchor_that_does_not_exist_is_caught():
    assert defined("fed.py", "Federation.run_round") and defined("aggregators.py", "eq8_objective")
    assert not defined("fed.py", "Federation.no_such_method")
    assert not defined("aggregators.py", "Federation")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    text = page.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md":
            headings = [slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)]
            if anchor not in headings:
                broken.append(target)
    assert not broken, f"{page.name}: links to nothing: {broken}"


def test_readme_stays_a_front_door():
    """About 200 lines: detail lives in docs/ and bench/README.md."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 220


def test_no_definition_is_longer_than_a_reader_holds():
    """Every class and function in the project's modules (root, bench/, examples/) at most about
    250 lines: a new feature splits its code rather than growing one definition."""
    files = [*ROOT.glob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "examples").rglob("*.py")]
    long = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.end_lineno - node.lineno + 1 > 260:
                long.append(f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert len(files) >= 10
    assert not long, f"definitions over about 250 lines: {long}"
