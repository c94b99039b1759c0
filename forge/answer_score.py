"""An answer scored against its reference: exact (the same text), normalised (the same words once case,
punctuation, articles and spacing are set aside), contains (the reference's words appear, in order and
together, inside the answer), or no match. A reference may list several accepted answers; the best match
counts."""

from __future__ import annotations

import re
import unicodedata

MATCHES = ("exact", "normalised", "contains")  # best first
_ARTICLES = {"a", "an", "the"}


def words(text: str, articles: bool = False) -> list[str]:
    """Lower case, accents and punctuation gone, articles dropped (kept with ``articles``): the words compared."""
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return [w for w in re.findall(r"[^\W_]+", text) if articles or w not in _ARTICLES]


def _inside(needle: list[str], hay: list[str]) -> bool:
    n = len(needle)
    return n > 0 and any(hay[i:i + n] == needle for i in range(len(hay) - n + 1))


def match(answer: str, references: str | list[str]) -> str | None:
    """The best of exact / normalised / contains over the accepted references; None when none match."""
    refs = [references] if isinstance(references, str) else list(references)
    said = words(answer)
    best = None
    for ref in refs:
        if answer.strip() == ref.strip():
            return "exact"
        wanted, heard, letter = words(ref), said, False
        if not wanted:  # a reference that is all article ("A", a multiple-choice letter): only the whole answer
            wanted, heard, letter = words(ref, articles=True), words(answer, articles=True), True
        if heard and heard == wanted:
            best = "normalised"
        elif best is None and not letter and _inside(wanted, heard):
            best = "contains"
    return best


def rank(found: str | None) -> int:
    """3 for exact, 2 normalised, 1 contains, 0 no match: answers compared by how well they matched."""
    return len(MATCHES) - MATCHES.index(found) if found in MATCHES else 0


def tally(found: list[str | None]) -> dict:
    """How many answers matched, and at which level (each level counts the better ones too)."""
    out = {level: sum(1 for f in found if 0 < rank(f) >= rank(level)) for level in MATCHES}
    return {**out, "matched": out["contains"], "of": len(found)}
