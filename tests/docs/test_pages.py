"""The README and the pages under docs/: every relative link resolves, anchors included, and every
YAML job config they show is a valid config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import build_config
from tests.helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose(path: Path) -> str:
    """The page outside fenced code blocks (blanked, so that line numbers stay), code spans blanked too."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            line = ""
        lines.append("" if fenced else re.sub(r"`[^`]*`", lambda span: "`" * len(span.group()), line))
    return "\n".join(lines)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (links as their text, no HTML), lower case,
    punctuation dropped except `-` and `_`, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Resume, exactly once", "resume-exactly-once"),
        ("`stats.json`", "statsjson"),
        ("`sdxl-batch tune CONFIG`", "sdxl-batch-tune-config"),
        ("Live: progress line, Ray metrics, Grafana", "live-progress-line-ray-metrics-grafana"),
        ("Scheduled rendering (a manifest prefix that grows)", "scheduled-rendering-a-manifest-prefix-that-grows"),
        ("`model_path` and [a link](x.md)", "model_path-and-a-link"),
    ],
)
def test_github_slugs(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def _relative_links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every link and image on the page that is not a URL with a scheme."""
    text = _prose(page)
    found = []
    for link in LINK.finditer(text):  # a link's text may wrap over lines
        if not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", link.group(1)):  # https:, mailto: are not checked
            found.append((text.count("\n", 0, link.start()) + 1, link.group(1)))
    return found


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        for number, target in _relative_links(page):
            where = f"{page.relative_to(REPO)}:{number}: {target}"
            file_part, _, anchor = target.partition("#")
            resolved = (page.parent / file_part).resolve() if file_part else page
            if not resolved.is_relative_to(REPO) or not resolved.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
                broken.append(f"{where} (no heading #{anchor} in {resolved.relative_to(REPO)})")
    assert sum(len(_relative_links(page)) for page in PAGES) > 20, "the link pattern finds the links"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    unlinked = [page.name for page in PAGES[1:] if f"](docs/{page.name}" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_yaml_job_configs_in_the_pages_are_valid() -> None:
    """A ```yaml block with `manifest:` is a job config a reader may copy: it must load."""
    shown = 0
    for page in PAGES:
        for block in re.findall(r"^```yaml\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S):
            data = yaml.safe_load(block)
            if isinstance(data, dict) and "manifest" in data:
                build_config(data, source=str(page.relative_to(REPO)))
                shown += 1
    assert shown >= 1
