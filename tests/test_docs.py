"""The documentation's links hold: every relative link in README.md and docs/ names a file that exists, and every
#anchor a heading of that file (GitHub's rule for heading ids), so a page that loses a section cannot leave its
readers at a dead link. Code blocks are not read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def slug(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped (word characters, spaces and hyphens stay), each
    space a hyphen."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _prose(text: str) -> str:
    """The page without fenced code blocks and inline code (links there are examples, not links)."""
    text = re.sub(r"^(```+|~~~+).*?^\1", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in re.sub(r"^(```+|~~~+).*?^\1", "", page.read_text(), flags=re.S | re.M).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links() -> list[tuple[Path, str]]:
    found = []
    for page in PAGES:
        for target in LINK.findall(_prose(page.read_text())):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked here
                found.append((page, target))
    return found


def test_the_pages_have_links_to_check():
    assert len(links()) > 20


@pytest.mark.parametrize(("page", "target"), links(), ids=lambda v: v if isinstance(v, str) else v.name)
def test_every_relative_link_and_anchor_resolves(page, target):
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    assert file.exists(), f"{page.relative_to(ROOT)} links to {target}: no such file"
    assert ROOT in file.parents or file == ROOT, f"{page.relative_to(ROOT)} links outside the repository: {target}"
    if anchor and file.suffix == ".md":
        assert anchor in anchors(file), f"{page.relative_to(ROOT)} links to {target}: no such heading"


def test_github_slugs():
    assert slug("`make pretrain` + `make finetune` today: 81.9 against scratch 78.4 (renderer 3)") == \
        "make-pretrain--make-finetune-today-819-against-scratch-784-renderer-3"
    assert slug("What is trusted, and the limits") == "what-is-trusted-and-the-limits"


def test_ci_turns_a_skip_for_a_missing_package_into_a_failure(tmp_path):
    """.ci/run sets FRACGEN_NO_SKIP=1: there a test skipped for a missing extra fails (tests/conftest.py)."""
    import os
    import shutil
    import subprocess
    import sys

    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_x.py").write_text('import pytest\n\n\ndef test_needs_it():\n'
                                        '    pytest.importorskip("no_such_package_for_fracgen")\n')
    runs = {}
    for flag in ("0", "1"):
        env = {**os.environ, "FRACGEN_NO_SKIP": flag, "PYTHONPATH": str(ROOT)}
        runs[flag] = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                                    cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert runs["0"].returncode == 0 and "1 skipped" in runs["0"].stdout
    assert runs["1"].returncode == 1 and "1 failed" in runs["1"].stdout and "FRACGEN_NO_SKIP" in runs["1"].stdout
