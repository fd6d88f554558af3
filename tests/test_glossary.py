"""The glossary's pointers into the chapters stay true when chapters are renumbered: every
"{doc}`../notebooks/<chapter>` (section N)" names a section the chapter has, and that section speaks of the entry's
term (the term, or each of its words' stems, occurs in it), or the pointer names the section's title as
"(section N, "Title")"."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GLOSSARY = (ROOT / "book" / "glossary.md").read_text()
POINTER = re.compile(r"\{doc\}`\.\./notebooks/(\w+)`\s*\(sections?\s+(\d+)(?:\s+and\s+(\d+))?(?:,\s*\"([^\"]+)\")?")


def section_headings(chapter: str) -> dict[str, str]:
    """Section number -> the text of every heading in it ("## 2. The equations" and its "### Scaling")."""
    sections: dict[str, str] = {}
    number = None
    for cell in json.loads((ROOT / "notebooks" / f"{chapter}.ipynb").read_text())["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        for line in "".join(cell["source"]).splitlines():
            if match := re.match(r"##\s+(\d+)\.\s+(.*)", line):
                number = match.group(1)
                sections[number] = match.group(2)
            elif re.match(r"##\s", line):   # "## Exercises", "## Summary": outside the numbered sections
                number = None
            elif line.startswith("#") and number is not None:
                sections[number] += " / " + line.lstrip("#").strip()
    return sections


def glossary_entries() -> list[tuple[list[str], str]]:
    """(the entry's terms, its definition) for every entry of the {glossary} block."""
    block = GLOSSARY[GLOSSARY.index("```{glossary}"):].split("\n```")[0]
    entries: list[tuple[list[str], str]] = []
    for line in block.splitlines()[2:]:
        if line and not line.startswith(" "):
            if not entries or entries[-1][1]:
                entries.append(([], ""))
            entries[-1][0].append(line.strip())
        elif line.strip():
            entries[-1] = (entries[-1][0], entries[-1][1] + line + "\n")
    return entries


POINTERS = [(terms[0], chapter, number, title) for terms, definition in glossary_entries()
            for chapter, first, second, title in POINTER.findall(definition) for number in (first, second) if number]
TERMS = {terms[0]: terms for terms, _ in glossary_entries()}


def test_the_glossary_points_into_the_chapters():
    assert len(POINTERS) >= 8, "the pattern no longer finds the glossary's section pointers"


@pytest.mark.parametrize("term,chapter,number,title", POINTERS, ids=[f"{t}-{c}-{n}" for t, c, n, _ in POINTERS])
def test_each_pointer_names_a_section_about_the_term(term, chapter, number, title):
    sections = section_headings(chapter)
    assert number in sections, (f"the glossary's {term!r} points to section {number} of {chapter}, which has "
                                f"sections {sorted(sections, key=int)}")
    if title:
        assert title.lower() in sections[number].lower(), (
            f"the glossary calls section {number} of {chapter} {title!r}; its headings are {sections[number]!r}")
        return
    prose = _prose_of(chapter, number)
    spoken_of = any(t.lower() in prose or all(w[:6] in prose for w in re.findall(r"[a-z³]{4,}", t.lower()))
                    for t in TERMS[term])
    assert spoken_of, (f"the glossary's {term!r} points to section {number} of {chapter} "
                       f"({sections[number]!r}), which never names it: point to the right section, or name the "
                       f'section as (section {number}, "Title")')


def _prose_of(chapter: str, number: str) -> str:
    text, inside = [], False
    for cell in json.loads((ROOT / "notebooks" / f"{chapter}.ipynb").read_text())["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        for line in "".join(cell["source"]).splitlines():
            if match := re.match(r"##\s+(\d+)\.", line):
                inside = match.group(1) == number
            elif re.match(r"##\s", line):
                inside = False
            if inside:
                text.append(line)
    return "\n".join(text).lower()
