"""Small text helpers for question and answer checks: sentences, content words, spans."""

from __future__ import annotations

import functools
import re

from docent.prompts import normalise, squash

# A deliberately small list: words that carry no topic, so overlap counts only real content.
_STOPWORDS = """
a an the and or but if of to in on at by for with from as is are was were be been being do does
did done have has had having i you he she it we they me my your our their its this that these
those there here what which who whom whose when where why how can could should would will shall
may might must not no yes any all some each every more most other such than then so too very
just also about into over under up down out off again once only own same s t don doesn isn aren
wasn weren won get gets got much many
"""
STOPWORDS = frozenset(_STOPWORDS.split())
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])|\n+")


@functools.lru_cache(maxsize=1)
def _stemmer():  # type: ignore[no-untyped-def]
    import Stemmer

    return Stemmer.Stemmer("english")


def content_words(text: str) -> set[str]:
    words = [w for w in normalise(text).split() if w not in STOPWORDS and len(w) > 1]
    return set(_stemmer().stemWords(words))


def sentences(text: str) -> list[str]:
    """Sentences (and list items / lines) of a chunk, whitespace-normalised, verbatim."""
    return [squash(s) for s in _SENTENCE_END.split(text) if s and s.strip()]


def find_span(needle: str, haystack: str) -> str | None:
    """The verbatim span of ``haystack`` that matches ``needle`` ignoring case and
    whitespace, or ``None``."""
    needle = squash(needle).strip(" .,:;\"'`*")
    if not needle:
        return None
    flat = squash(haystack)
    at = flat.lower().find(needle.lower())
    return flat[at : at + len(needle)] if at >= 0 else None


def sentence_with(span: str, text: str) -> str | None:
    """The sentence of ``text`` holding ``span`` (or the run of sentences it crosses)."""
    parts = sentences(text)
    lowered = span.lower()
    for part in parts:
        if lowered in part.lower():
            return part
    for width in (2, 3):
        for i in range(len(parts) - width + 1):
            joined = " ".join(parts[i : i + width])
            if lowered in joined.lower():
                return joined
    return None
