"""Which retrieved sentence states an answer: the one rule that serving and ``docent eval``
share, so the eval table measures the evidence users are shown.

Citations used to exist only when the model quoted. A model that does not quote still gives an
answer, and users deserve to see where it comes from, or to learn that nothing retrieved says
it (the embedded model once answered "7 days" for links the handbook gives 72 hours). So Docent
looks, among the retrieved chunks, for the sentence that states the answer itself.

Answer text is normalised as SQuAD's evaluation script does (lowercase, punctuation and the
articles a/an/the removed, whitespace collapsed), with Unicode letters kept and accents and
compatibility forms folded (NFKD), so "Café" and "cafe" match. ``eval.metrics`` scores answers
with these same functions.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from docent.prompts import ANSWER_PREFIX, BEGIN_QUOTE, END_QUOTE, ContextDoc, parse_answer
from raft.text import content_words, sentences

# An answer with fewer content words than this ("72 hours", "Quick Capture", "CEO") must
# appear in the sentence as it is; paraphrase is judged only on longer answers, where the
# words themselves carry enough meaning to compare.
SHORT_ANSWER_WORDS = 3
# A longer answer is stated by a sentence that holds at least this share of its content
# words and every number in it: "Invitation links are valid for 72 hours once sent" is stated
# by "Invitation links are valid for 72 hours" (5 of 6), "Links last 7 days" never is.
COVERAGE = 0.75

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_ALTERNATIVES = re.compile(r"\bor\b", re.IGNORECASE)
_POLARITY = re.compile(r"\b(yes|no|not|never|none|nothing|nobody|cannot|cant|only)\b|n t\b")
_FIRST_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])|\n")


def normalize_answer(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = text.lower()
    # Unicode punctuation and symbols (categories P*, S*: ASCII punctuation, curly quotes,
    # dashes, "°", "€") separate words: "0°C" states "0", "€29" states "29".
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def final_answer(output: str) -> str:
    """What an output commits to as its answer: the ``<ANSWER>:`` line, or, for output with
    no such line, its first sentence. Scoring only this keeps an output from counting by
    rambling through every candidate (the headline metric of ``docent eval``)."""
    if ANSWER_PREFIX in output:
        return parse_answer(output).answer
    text = output.strip()
    return _FIRST_SENTENCE.split(text, maxsplit=1)[0].strip() if text else ""


def contains_phrase(text: str, phrase: str) -> bool:
    """Whether normalised ``phrase`` appears in normalised ``text`` on word bounds ("72
    hours" is in "links last 72 hours", "7" is not in "72"). An empty phrase never does."""
    needle = normalize_answer(phrase)
    return bool(needle) and f" {needle} " in f" {normalize_answer(text)} "


def numbers(text: str) -> set[str]:
    """The words of ``text`` that hold a digit, normalised (what a claim must not invent)."""
    return {w for w in normalize_answer(text).split() if any(ch.isdigit() for ch in w)}


def _unmarked(text: str) -> str:
    # Quote markers are format, not content (they reach here when a model forgets <ANSWER>:).
    return text.replace(BEGIN_QUOTE, " ").replace(END_QUOTE, " ")


def supports(sentence: str, answer: str) -> bool:
    """Whether ``sentence`` states ``answer``: the answer appears in it on word bounds, or,
    for an answer of ``SHORT_ANSWER_WORDS`` content words or more, the sentence holds at least
    ``COVERAGE`` of them and every number of the answer."""
    answer = _unmarked(answer)
    if contains_phrase(sentence, answer):
        return True
    wanted = content_words(answer)
    if len(wanted) < SHORT_ANSWER_WORDS or not numbers(answer) <= numbers(sentence):
        return False
    return len(wanted & content_words(sentence)) >= COVERAGE * len(wanted)


def echoes(answer: str, question: str) -> bool:
    """Whether ``answer`` says nothing the question does not: all its content words and
    numbers are the question's ("Quillfeather API" for "Which languages have an official
    Quillfeather API SDK?", run 5's answer to a question the handbook cannot answer). A yes/no
    answer ("does not count") states its polarity, and a pick from alternatives the question
    offers ("... A or B?") states the pick, so neither echoes."""
    text = _unmarked(answer)
    wanted = content_words(text)
    if not wanted or not question.strip() or _ALTERNATIVES.search(question):
        return False
    if _POLARITY.search(normalize_answer(text)):
        return False
    return wanted <= content_words(question) and numbers(text) <= numbers(question)


@dataclass(frozen=True)
class Attribution:
    """The retrieved sentence an answer is attributed to."""

    document: int  # 0-based position of the chunk among the retrieved ones
    sentence: str  # verbatim from the chunk (its whitespace kept, so pages can highlight it)


def evidences(sentence: str, answer: str, question: str) -> bool:
    """Whether ``sentence`` is evidence for ``answer`` to ``question``: it states the answer
    (``supports``) and, for a short answer, is about what was asked. "CEO" or "30 days" is
    stated by many sentences; only one sharing a content word with ``question`` (when the
    question has any: every handbook question shares one with its evidence sentence) counts.
    Quotes and attributed sentences are held to this same rule, so a model cannot ground an
    answer by quoting an unrelated sentence that happens to hold it. An answer that only
    echoes the question (``echoes``) has no evidence: it states nothing to support."""
    if not supports(sentence, answer) or echoes(answer, question):
        return False
    asked = content_words(question) if question.strip() else set()
    short = len(content_words(_unmarked(answer))) < SHORT_ANSWER_WORDS
    return not (short and asked and not asked & content_words(sentence))


def attribute(answer: str, docs: Sequence[ContextDoc], question: str = "") -> Attribution | None:
    """The sentence of a retrieved chunk that is evidence for ``answer`` (``evidences``), or
    None. Of those, the one sharing most content words with the question wins; on ties the
    higher-ranked chunk, then the earlier sentence."""
    if not normalize_answer(_unmarked(answer)):
        return None
    asked = content_words(question) if question.strip() else set()
    best: tuple[int, Attribution] | None = None
    for n, doc in enumerate(docs):
        for sentence in sentences(doc.text):
            if not evidences(sentence, answer, question):
                continue
            overlap = len(asked & content_words(sentence))
            if best is None or overlap > best[0]:
                best = (overlap, Attribution(n, _verbatim(sentence, doc.text)))
    return best[1] if best else None


def _verbatim(sentence: str, text: str) -> str:
    """``sentence`` as it is written in ``text`` (``sentences`` collapses whitespace)."""
    pattern = r"\s+".join(re.escape(word) for word in sentence.split())
    found = re.search(pattern, text)
    return found.group(0) if found else sentence
