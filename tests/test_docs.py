"""The documentation: the generated flag reference is current, committed text names no
development machine and tells no story of its development, the README stays a short guide,
and every relative link in the Markdown pages leads somewhere."""

import re
from pathlib import Path

import pytest

from retina_tf.flags import reference_markdown

REPO = Path(__file__).resolve().parents[1]
MARKDOWN = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])

# Paths of the machine the project is developed on: a user's data lives in data/<DATASET>, runs
# in logs/<run>.
MACHINE_PATHS = ("/work/", "../shared")
DOC_ONLY_PATHS = ("/tmp/",)  # fine in code (tests, temporary files), not in a user's guide
# Words about how the work went rather than what the software does or measured.
HISTORY_WORDS = ("previous session", "this session", "last session", "the issue's bar",
                 "in this issue", "the issue asks", "the issue allows", "we tried")


def _committed_text() -> list[Path]:
    files = [*MARKDOWN, *(REPO / "configs").iterdir(), *(REPO / "bin").glob("*.py"),
             *(p for p in (REPO / "bench").rglob("*") if p.is_file()),
             *(REPO / "retina_tf").rglob("*.py")]
    for shipped in (REPO / "retina_tf" / "pretrained").iterdir():
        files += [*shipped.glob("*.json"), *shipped.glob("flags.txt")]
    return sorted(p for p in files if p.is_file() and "__pycache__" not in p.parts)


def test_cli_reference_is_current():
    committed = (REPO / "docs" / "cli.md").read_text()
    assert committed == reference_markdown(), (
        "docs/cli.md is out of date with the flag definitions: run `make docs` "
        "(python -m retina_tf.flags docs/cli.md)")


def test_cli_reference_covers_every_script():
    reference = reference_markdown()
    missing = [p.name for p in sorted((REPO / "bin").glob("*.py"))
               if not p.name.startswith("_") and f"## `bin/{p.name}`" not in reference]
    assert not missing, (f"docs/cli.md has no section for {', '.join(missing)}: define its flags "
                         "through retina_tf.flags (SCRIPTS or EXTRA_FLAGS)")


def test_the_text_scanner_finds_what_it_looks_for(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("fine\nrun with --data_dir=../shared/data/DRIVE\nas in the previous session\n")
    assert _hits(page, is_doc=True) == [
        f"{page}:2: ../shared", f"{page}:3: previous session"]


def _hits(path: Path, is_doc: bool) -> list[str]:
    words = MACHINE_PATHS + (DOC_ONLY_PATHS if is_doc else ())
    found = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        lower = line.lower()
        found += [f"{path}:{number}: {w}" for w in words if w in line]
        found += [f"{path}:{number}: {w}" for w in HISTORY_WORDS if w in lower]
    return found


def test_no_machine_paths_or_development_history_in_committed_text():
    hits = [hit for path in _committed_text()
            for hit in _hits(path, is_doc=path.suffix == ".md")]
    assert not hits, ("machine paths or words about the development's history (write data/"
                      "<DATASET>, logs/<run> and what was measured):\n" + "\n".join(
                          hit.replace(f"{REPO}/", "") for hit in hits))


def test_readme_is_a_short_guide():
    size = (REPO / "README.md").stat().st_size
    assert size < 16_000, (f"README.md is {size} bytes: keep it a user's guide under 16 000 "
                           "and move details to docs/")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}


def _links(path: Path) -> list[str]:
    """Link and image targets outside code blocks, code spans and indented code."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("    "))
    text = re.sub(r"`[^`]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)


def test_links_and_anchors_are_read_as_github_renders_them(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Train, evaluate, watch\n\n## EAR-Net: two stages\n\n"
                    "See [the guide](guide.md#top) and ![a picture](img/a.png \"title\").\n"
                    "Not links: `[x](code.md)`,\n\n    [y](indented.md)\n\n"
                    "```\n[z](fenced.md)\n# not a heading\n```\n")
    assert _links(page) == ["guide.md#top", "img/a.png"]
    assert _anchors(page) == {"train-evaluate-watch", "ear-net-two-stages"}


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_lead_to_existing_files_and_headings(page):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)
