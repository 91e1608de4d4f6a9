"""The front door and the docs: every relative link and image resolves (files, and #anchors to headings)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings (lower case, punctuation dropped, spaces → hyphens)."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def outside_code(text: str) -> str:
    """The text without fenced code blocks (a link inside one is an example, not a link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_and_image_resolves(page):
    links = LINK.findall(outside_code(page.read_text()))
    broken = []
    for target in links:
        if re.match(r"[a-z]+:", target):  # https:, mailto: — not checked offline
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or (anchor and resolved.suffix == ".md" and anchor not in anchors(resolved)):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_the_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", (ROOT / "README.md").read_text()))
    assert linked == {page.name for page in PAGES[1:]}, "every docs/ page is linked from the README"


def test_ci_runs_the_readmes_test_command_with_the_lock():
    """CI installs and tests exactly as the README tells a user to, from the lock of tested versions."""
    blocks = re.findall(r"^```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.MULTILINE | re.DOTALL)
    test_command = next(block for block in blocks if "pytest" in block)
    ci_lines = (ROOT / ".ci/run").read_text().splitlines()
    ci = [" ".join(line.split("#")[0].replace(" -q", "").split()) for line in ci_lines]  # no comments, no -q
    steps = [" ".join(step.split()) for step in test_command.split("&&")]
    missing = [step for step in steps if step not in ci]
    assert not missing, f".ci/run lacks the README's steps {missing}"
    installs = [step for step in steps if step.startswith("pip install") and "--no-deps" not in step]
    assert installs and all("-c constraints.txt" in step for step in installs), "the README installs without the lock"
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        assert line.startswith("#") or re.fullmatch(r"[a-z0-9\-]+==[\w.]+", line), f"constraints.txt: {line!r}"
