"""docs/design.md: every section a comment cites exists, so a renumbering cannot strand one."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[1]
DESIGN: Final = ROOT / "docs" / "design.md"
# "## 5. The message lifecycle" and "### 5.1 One cycle": the numbers comments cite.
_HEADING: Final = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", re.M)
# "docs/design.md §8.5, §9" or "docs/design.md §5.2, invariant 1": the prefix, then every §N
# that follows it in the same sentence.
_CITATION: Final = re.compile(r"docs/design\.md\s+((?:§\d+(?:\.\d+)?[^§\n.;)]*)+)")
_SECTION: Final = re.compile(r"§(\d+(?:\.\d+)?)")


def sections() -> set[str]:
    return set(_HEADING.findall(DESIGN.read_text(encoding="utf-8")))


def citations() -> list[tuple[str, str]]:
    """(file:line, section) of every ``docs/design.md §N`` in the code, tests and docs."""
    found: list[tuple[str, str]] = []
    files = [*ROOT.glob("connector/**/*.py"), *ROOT.glob("connector/**/*.c")]
    files += [*ROOT.glob("tests/**/*.py"), *ROOT.glob("*.md"), *ROOT.glob("*.toml")]
    for path in files:
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            for cited in _CITATION.findall(line):
                found.extend((where, section) for section in _SECTION.findall(cited))
    return found


def test_headings_are_numbered_in_order() -> None:
    numbers = _HEADING.findall(DESIGN.read_text(encoding="utf-8"))
    top = [int(n) for n in numbers if "." not in n]
    assert top == list(range(1, len(top) + 1))
    for n in numbers:
        if "." in n:
            assert n.split(".")[0] in numbers


def test_every_cited_section_exists() -> None:
    known = sections()
    cited = citations()
    assert cited, "no citations found: the pattern no longer matches the code"
    missing = [f"{where}: §{section}" for where, section in cited if section not in known]
    assert not missing, "docs/design.md has no such section:\n" + "\n".join(missing)
