"""The docs stay true to the code: every "semantics §x.y" citation names a section of docs/semantics.md.

A file that cites the spec at least once (and every file under reference/, the executable spec) uses
bare "§x.y" with the same numbering, so those are checked as well.
"""

import re
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "docs" / "semantics.md"
TREES = ("adapterhub", "reference", "cuda", "bench", "tests", "docs")
SUFFIXES = {".py", ".c", ".h", ".cu", ".cpp", ".md"}

HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)  # "## 1. NF4", "### 1.3 Blocks"
CITATION = re.compile(r"(?i)semantics(?:\.md)?\s*§\s*(\d+(?:\.\d+)*)")  # "SEMANTICS §1.3", "semantics.md §2"
BARE = re.compile(r"§\s*(\d+(?:\.\d+)*)")  # "§1.3" in a file that cites the spec
OUTSIDE = re.compile(r"\.\./shared|/work/shared|SEMANTICS\.md")  # files that are not in the repository
TRACKER = re.compile(r"(?i)\bissues?\s*#?\d+|#\d{1,4}\b")  # "issue 4", "#12"


def spec_sections() -> set[str]:
    return set(HEADING.findall(SPEC.read_text(encoding="utf-8")))


def sources() -> list[Path]:
    """README.md and the source / doc files of the scanned trees (this file excepted: it holds the patterns)."""
    files = [ROOT / "README.md"]
    for tree in TREES:
        files += sorted(
            path for path in (ROOT / tree).rglob("*")
            if path.suffix in SUFFIXES and path.is_file()
            and not any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(ROOT).parts)
        )
    return [path for path in files if path != Path(__file__).resolve()]


def matches(path: Path, pattern: re.Pattern) -> list[tuple[str, str]]:
    """("file:line", matched group or text) for every match of pattern in path."""
    text = path.read_text(encoding="utf-8", errors="replace")
    where = lambda m: f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"  # noqa: E731
    return [(where(m), m.group(1) if pattern.groups else m.group(0)) for m in pattern.finditer(text)]


def test_spec_keeps_its_numbering():
    """Sections are never renumbered, since the code cites them: §1-§11 and their subsections exist."""
    subsections = {1: 6, 2: 4, 3: 4, 4: 5, 5: 6, 6: 4}
    expected = {str(n) for n in range(1, 12)} | {f"{n}.{k}" for n, count in subsections.items() for k in range(1, count + 1)}
    assert expected <= spec_sections(), sorted(expected - spec_sections())


def test_every_citation_names_a_section():
    sections = spec_sections()
    unresolved = []
    for path in sources():
        text = path.read_text(encoding="utf-8", errors="replace")
        cites = path == SPEC or ROOT / "reference" in path.parents or CITATION.search(text)
        for where, number in matches(path, BARE if cites else CITATION):
            if number not in sections:
                unresolved.append(f"{where}: §{number}")
    assert not unresolved, "citations of sections docs/semantics.md does not have:\n" + "\n".join(unresolved)


def test_no_reference_to_files_outside_the_repository():
    found = [f"{where}: {text}" for path in sources() for where, text in matches(path, OUTSIDE)]
    assert not found, "\n".join(found)


def test_user_docs_name_no_tracker_issues():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    found = [f"{where}: {text}" for path in docs for where, text in matches(path, TRACKER)]
    assert not found, "\n".join(found)
