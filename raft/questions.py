"""Questions from chunks: teacher prompt, parsing, filters and (near-)duplicate removal."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from docent.prompts import normalise
from raft.text import content_words

MIN_WORDS, MAX_WORDS = 4, 40
NEAR_DUPLICATE_COSINE = 0.92
# Questions that point at the text instead of the domain can't be asked by a real user.
META_REFERENCE = re.compile(
    r"\b(passage|the text|this text|the document|this document|the article|the author|"
    r"according to|mentioned above|the above|this section|the excerpt|the context)\b",
    re.IGNORECASE,
)
_NUMBERING = re.compile(r"^\s*(?:[-*•]|\(?\d+[.)]|q\d*[:.)]|question\s*\d*[:.)])\s*", re.I)

QUESTION_SYSTEM = (
    "You write questions that customers and staff ask about a product or organisation. "
    "Each question must be answerable from the given passage alone and must name the concrete "
    "thing it asks about (a plan, a feature, an error code, a person, a date), never 'the "
    "passage' or 'the text'."
)


def question_messages(chunk_text: str, title: str | None, n: int) -> list[dict[str, str]]:
    heading = f" from '{title}'" if title else ""
    user = (
        f"Passage{heading}:\n{chunk_text.strip()}\n\n"
        f"Write {n} different questions that this passage answers. "
        "One question per line, each ending with a question mark, nothing else."
    )
    return [{"role": "system", "content": QUESTION_SYSTEM}, {"role": "user", "content": user}]


def parse_questions(text: str) -> list[str]:
    """Question lines of a teacher reply, numbering and bullets removed."""
    found = []
    for line in text.splitlines():
        line = _NUMBERING.sub("", line).strip().strip('"').strip()
        if "?" in line:
            line = line[: line.index("?") + 1]
            found.append(line)
    return found


def check_question(question: str, chunk_text: str) -> str | None:
    """The rejection reason for one question, or ``None`` when it passes."""
    words = question.split()
    if not question.endswith("?") or not MIN_WORDS <= len(words) <= MAX_WORDS:
        return "bad_format"
    if META_REFERENCE.search(question):
        return "names_the_passage"
    # A question the chunk answers shares real content words with it.
    if len(content_words(question) & content_words(chunk_text)) < 2:
        return "not_about_chunk"
    return None


@dataclass
class Candidate:
    chunk_id: str
    question: str


def drop_duplicates(
    candidates: Sequence[Candidate],
    vectors: np.ndarray | None,
    threshold: float = NEAR_DUPLICATE_COSINE,
) -> tuple[list[int], Counter[str]]:
    """Indices to keep (first occurrence wins) and counts of what was dropped. ``vectors`` are
    normalised question embeddings (rows aligned with ``candidates``) for near-duplicates."""
    keep: list[int] = []
    dropped: Counter[str] = Counter()
    seen: set[str] = set()
    for i, cand in enumerate(candidates):
        key = normalise(cand.question)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        if vectors is not None and keep:
            best = float(np.max(vectors[keep] @ vectors[i]))
            if best >= threshold:
                dropped["near_duplicate"] += 1
                continue
        seen.add(key)
        keep.append(i)
    return keep, dropped
