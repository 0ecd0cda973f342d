"""docs/method.md: its sections are numbered 1-8, and every citation of it names a section it has."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
#: "method.md 4", "docs/method.md section 2.3", "method.md sections 4, 6", "method.md 3 and 6"
CITATION = re.compile(r"method\.md,? (?:sections? )?(\d+(?:\.\d+)?(?:(?:, | and )\d+(?:\.\d+)?)*)")
WHERE = ("steerkit", "tests", "benchmarks", "configs", "notebooks", "scripts", "docs")


def sections() -> set[str]:
    heads = re.findall(r"^#{2,3} (\d+(?:\.\d+)?) ", METHOD.read_text(encoding="utf-8"), re.MULTILINE)
    return set(heads)


def test_sections_are_numbered_like_the_citations() -> None:
    top = sorted(int(s) for s in sections() if "." not in s)
    assert top == list(range(1, 9))
    assert {"2.1", "2.2", "2.3"} <= sections()  # Stage I's three kinds


def test_every_citation_names_an_existing_section() -> None:
    files = [ROOT / "README.md", *(p for d in WHERE for p in (ROOT / d).rglob("*")
                                   if p.suffix in {".py", ".md", ".yaml", ".ipynb"})]
    known = sections()
    bad = []
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for group in CITATION.findall(line):
                for number in re.split(r", | and ", group):
                    if number not in known:
                        bad.append(f"{path.relative_to(ROOT)}:{n}: method.md {number}")
    assert not bad, "citations of sections docs/method.md does not have:\n" + "\n".join(bad)
