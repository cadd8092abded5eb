"""Answer-first question generation for small teachers.

A 135M model writes poor open-ended questions and cannot be trusted to find an answer, so
Docent picks the answers itself: short factual spans (codes, amounts, dates, durations, names)
inside one sentence of the chunk. The teacher only has to phrase a question for a given
(sentence, answer) pair, a much easier task, and every result is checked: the question must
not contain its answer, must ask for the answer's kind ("when" for a date), and must lead
retrieval back to its chunk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from docent.prompts import normalise
from raft.text import content_words, sentences

_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_UNITS = (
    r"%|percent|EUR|USD|GBP|€|\$|GB|MB|TB|KB|GHz|MHz|W|kW|V|GbE|ms|seconds?|minutes?|"
    r"hours?|days?|working days|business days|weeks?|months?|years?|seats?|users?|"
    r"requests?|members?|pages?|files?|characters?|attempts?|devices?|times|"
    r"notes?|workspaces?|guests?|licen[cs]es?|credits?"
)
PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    (
        "date",
        re.compile(rf"\b\d{{1,2}} (?:{_MONTHS}) \d{{4}}\b|\b(?:{_MONTHS}) \d{{1,2}}, \d{{4}}\b"),
    ),
    ("code", re.compile(r"(?<![\w-])[A-Z]{2,}(?:-[A-Z]+)*-\d{2,}(?:-\d+)*(?![\w-])")),
    ("time", re.compile(r"\b\d{1,2}:\d{2}\s?(?:[–-]\s?\d{1,2}:\d{2})?(?: [A-Z][a-z]+ time)?")),
    ("email", re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.]+\b")),
    ("amount", re.compile(rf"(?:[€$]\s?)?\b\d[\d,]*(?:\.\d+)?\s?(?:{_UNITS})(?: per \w+)?\b")),
    ("name", re.compile(r"(?<=[a-z,;:] )[A-Z][\w.]*(?: (?:[A-Z][\w.]*|\d[\d.]*)){1,3}\b")),
]
# Words a question must contain to ask for an answer of each kind.
ASKS_FOR = {
    "date": re.compile(r"\b(when|date|day|which year|what year)\b", re.I),
    "time": re.compile(r"\b(when|what time|hours|time)\b", re.I),
    "code": re.compile(r"\b(code|error|which|identifier|number|pattern|format)\b", re.I),
    "email": re.compile(r"\b(email|e-mail|address|contact|write|where)\b", re.I),
    "amount": re.compile(
        r"\b(how (many|much|long|often|big|large|fast|soon)|what (is|are) the "
        r"\w*\s?(price|cost|fee|limit|maximum|minimum|number|size|rate|"
        r"capacity|quota|discount|percentage|duration|period|length|amount)|"
        r"price|cost|limit|how)\b",
        re.I,
    ),
    "name": re.compile(r"\b(who|which|what|name)\b", re.I),
}
QUESTION_SYSTEM = (
    "Write the question a customer would ask to get the given answer. "
    "Never put the answer in the question. Reply with the question only."
)
# Few-shot pairs from an unrelated domain, so their facts cannot leak into the questions.
SHOTS = [
    (
        "The city library lends up to 12 books per card at a time.",
        "12 books",
        "How many books can I borrow at once with one library card?",
    ),
    (
        "The museum café closes on 24 December 2024 for the holidays.",
        "24 December 2024",
        "When does the museum café close for the holidays?",
    ),
    (
        "Lost cards are replaced at the front desk by Marta Olsen.",
        "Marta Olsen",
        "Who replaces a lost library card?",
    ),
]


@dataclass(frozen=True)
class Span:
    sentence: str
    answer: str
    kind: str


def candidate_spans(chunk_text: str, limit: int) -> list[Span]:
    """Up to ``limit`` answer spans, from different sentences, most specific kinds first."""
    found: list[Span] = []
    used_sentences: set[str] = set()
    parts = [s for s in sentences(chunk_text) if not s.startswith("#") and len(s.split()) >= 5]
    for kind, pattern in PATTERNS:
        for sentence in parts:
            if sentence in used_sentences:
                continue
            match = pattern.search(sentence)
            if match:
                answer = match.group(0).strip(" .,;:")
                found.append(Span(sentence, answer, kind))
                used_sentences.add(sentence)
                break
        if len(found) >= limit:
            break
    if len(found) < limit:  # a second pass lets one kind supply several spans
        for kind, pattern in PATTERNS:
            for sentence in parts:
                if len(found) >= limit:
                    return found
                match = pattern.search(sentence)
                if sentence not in used_sentences and match:
                    found.append(Span(sentence, match.group(0).strip(" .,;:"), kind))
                    used_sentences.add(sentence)
    return found[:limit]


def question_messages(span: Span) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": QUESTION_SYSTEM}]
    for fact, answer, question in SHOTS:
        messages.append({"role": "user", "content": f"Fact: {fact}\nAnswer: {answer}"})
        messages.append({"role": "assistant", "content": question})
    messages.append({"role": "user", "content": f"Fact: {span.sentence}\nAnswer: {span.answer}"})
    return messages


def clean_question(reply: str) -> str:
    for line in reply.strip().splitlines():
        line = re.sub(r"^\s*(question|q)\s*[:.]\s*", "", line.strip(), flags=re.I).strip('"')
        if "?" in line:
            return line[: line.index("?") + 1].strip()
    return reply.strip().splitlines()[0].strip() if reply.strip() else ""


def check_span_question(question: str, span: Span) -> str | None:
    """Rejection reason for a question written for ``span``, or ``None``."""
    if span.answer.lower() in question.lower():
        return "answer_in_question"
    if not ASKS_FOR[span.kind].search(question):
        return f"does_not_ask_for_{span.kind}"
    if len(content_words(question) & content_words(span.sentence)) < 2:
        return "not_about_chunk"
    return None


def answer_check_messages(question: str, span: Span) -> list[dict[str, str]]:
    """Round trip: the teacher answers its own question from the fact alone."""
    user = f"Fact: {span.sentence}\nQuestion: {question}\nAnswer with a few words from the fact."
    return [{"role": "user", "content": user}]


def round_trip_agrees(reply: str, span: Span) -> bool:
    """The teacher's answer names the span, and is not just the whole fact repeated."""
    words = reply.split()
    if not words or len(words) > len(span.answer.split()) + 8:
        return False
    return normalise(span.answer) in normalise(reply)
