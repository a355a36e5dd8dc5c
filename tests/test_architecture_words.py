"""Code, help texts and docs name things by what they are, never by a document this repository does not hold."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHERE = ("wsd", "wsctl", "clients", "docs", "man", "benchmarks", "examples", "README.md")
# a reference to a design document or an earlier codebase a reader here does not have
FORBIDDEN = re.compile(r"(?i:\bseed\b|seed_|\bthe spec\b)|\bSPEC\b")


def _files() -> list[Path]:
    out: list[Path] = []
    for name in WHERE:
        p = ROOT / name
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += [f for f in sorted(p.rglob("*")) if f.is_file() and "__pycache__" not in f.parts]
    return out


def test_no_file_refers_to_documents_the_repository_does_not_have():
    files = _files()
    assert len(files) > 50, "the scan found too few files: the layout changed"
    hits = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary data
        for n, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "name things by what they are:\n" + "\n".join(hits)


def test_the_pattern_catches_what_it_is_meant_to():
    for bad in ("the seed's MessageRouter", "seed_metrics", "SEED_MODE", "see SPEC section 4", "Seed_type",
                "as the spec says", "The Seed's pool"):
        assert FORBIDDEN.search(bad), bad
    for fine in ("seeded", "specification", "spec = referencing", "status, code = spec", "respect"):
        assert not FORBIDDEN.search(fine), fine
