"""Chain-of-thought answers that quote the oracle chunk, and the checks every answer passes.

A 135M teacher cannot be trusted to write a faithful chain of thought, so by default
(``extractive``) it is only asked for a short answer copied from the chunk; Docent then finds
that span in the chunk, quotes the sentence that holds it verbatim and writes the reasoning
around it. Whatever the teacher says that cannot be located in the oracle is rejected. A strong
remote teacher can write the whole chain of thought (``teacher``); its quotes are checked the
same way and a failing answer is repaired into the extractive form or rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

from docent.prompts import (
    ANSWER_PREFIX,
    DECLINE_ANSWER,
    format_answer,
    normalise,
    parse_answer,
    quote,
    squash,
)
from raft.text import content_words, find_span, sentence_with

MAX_ANSWER_WORDS = 16

ANSWER_SYSTEM = (
    "You answer questions from a passage. Reply with the shortest phrase from the passage that "
    "answers the question, copied exactly. If the passage does not answer it, reply NONE."
)
COT_SYSTEM = (
    "Answer the question from the documents. First reason step by step, copying the sentences "
    "you rely on word for word between ##begin_quote## and ##end_quote##. Then write the final "
    f"short answer on a last line that starts with {ANSWER_PREFIX}"
)


def short_answer_messages(question: str, chunk_text: str) -> list[dict[str, str]]:
    user = f"Passage:\n{chunk_text.strip()}\n\nQuestion: {question}\nShort answer:"
    return [{"role": "system", "content": ANSWER_SYSTEM}, {"role": "user", "content": user}]


def cot_messages(question: str, chunk_text: str) -> list[dict[str, str]]:
    user = f"Document:\n{chunk_text.strip()}\n\nQuestion: {question}"
    return [{"role": "system", "content": COT_SYSTEM}, {"role": "user", "content": user}]


@dataclass
class Answer:
    answer: str  # the short final answer
    quote: str  # the verbatim sentence of the oracle that supports it
    cot: str  # the full assistant text: reasoning with quotes, then <ANSWER>: ...


def extractive_answer(
    question: str, teacher_reply: str, chunk_text: str, source: str
) -> Answer | str:
    """An :class:`Answer` built around the teacher's short answer, or a rejection reason."""
    reply = teacher_reply.strip().splitlines()[0] if teacher_reply.strip() else ""
    reply = reply.removeprefix(ANSWER_PREFIX).strip()
    for prefix in ("Short answer:", "Answer:", "A:"):
        if reply.lower().startswith(prefix.lower()):
            reply = reply[len(prefix) :].strip()
    if not reply or normalise(reply) in ("none", "no answer", "unknown"):
        return "teacher_found_no_answer"
    if len(reply.split()) > MAX_ANSWER_WORDS:
        return "answer_too_long"
    span = find_span(reply, chunk_text)
    if span is None:
        return "answer_not_in_oracle"
    if normalise(span) and normalise(span) in normalise(question):
        return "answer_repeats_question"
    sentence = sentence_with(span, chunk_text)
    if sentence is None:
        return "answer_not_in_oracle"
    # The supporting sentence must be about what was asked, not a lucky string match.
    if not content_words(question) & content_words(sentence):
        return "quote_unrelated_to_question"
    return make_answer(question, span, sentence, source)


COT_FORMATS = ("reasoning", "quote", "answer_first", "own_words")


def make_answer(
    question: str, answer: str, sentence: str, source: str, fmt: str = "reasoning"
) -> Answer:
    """The target answer. Every format quotes the evidence verbatim and ends with the
    ``<ANSWER>:`` line; they differ in what comes first. ``reasoning``: the paper's chain of
    thought (restate, quote, conclude); ``quote``: the quoted sentence only; ``answer_first``:
    the answer, then the quote that supports it; ``own_words``: written as ``quote`` here, then
    rewritten to open with the model's own answer sentence (``raft.own_words``, which needs the
    model). Small models learn short chains more easily (ablated by bench/raft_gain.py)."""
    if fmt in ("quote", "own_words"):
        reasoning = quote(sentence)
    elif fmt == "answer_first":
        reasoning = f"{answer}. {quote(sentence)}"
    elif fmt == "reasoning":
        reasoning = (
            f"The question asks: {question.strip()} The document from {source} answers it: "
            f"{quote(sentence)} So the answer is {answer}."
        )
    else:
        raise ValueError(f"unknown answer format {fmt!r}: use one of {', '.join(COT_FORMATS)}")
    return Answer(answer=answer, quote=sentence, cot=format_answer(reasoning, answer))


def check_cot(cot: str, oracle_text: str) -> list[str]:
    """Problems with an answer's quotes and final answer against the oracle (empty: fine)."""
    parsed = parse_answer(cot)
    problems = []
    if ANSWER_PREFIX not in cot or not parsed.answer:
        problems.append("empty_answer")
    if not parsed.quotes:
        problems.append("no_quote")
    flat = squash(oracle_text).lower()
    if any(squash(q).lower() not in flat for q in parsed.quotes):
        problems.append("quote_not_in_oracle")
    if parsed.answer and normalise(parsed.answer) == normalise(DECLINE_ANSWER):
        problems.append("declined")
    return problems


def teacher_cot_answer(
    question: str, teacher_reply: str, chunk_text: str, source: str
) -> Answer | str:
    """Accept a teacher-written chain of thought whose quotes check out; otherwise repair it
    into the extractive form from its final answer, or reject it."""
    problems = check_cot(teacher_reply, chunk_text)
    parsed = parse_answer(teacher_reply)
    if not problems and len(parsed.answer.split()) <= MAX_ANSWER_WORDS:
        return Answer(answer=parsed.answer, quote=parsed.quotes[0], cot=teacher_reply.strip())
    repaired = extractive_answer(question, parsed.answer, chunk_text, source)
    if isinstance(repaired, Answer):
        return repaired
    return problems[0] if problems else repaired
