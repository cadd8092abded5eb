"""Targets in the model's own words (self-distillation), the ``own_words`` answer format.

Why: the 135M base model, given the retrieved chunks, answers well when it restates the
question and completes it from the context ("The rate limit per key on the Pro plan is 120
requests per minute."): the question's words are its key into the right sentence. Rule-written
targets that open with a quote make it pick the sentence at its first token, with no key, and
it picks the wrong one (19 of 24 misses in run 2, README). Here the base model answers each
training question with the oracle chunk, as serving prompts it; an answer whose first sentence
restates the question, states the rule answer and invents nothing the oracle sentence does not
say becomes the start of the target, followed by the verbatim quote and the ``<ANSWER>:`` line.
Other examples are dropped (rejection sampling, as in STaR, Zelikman et al. 2022). Learning
its own phrasing moves the model less than learning ours (Yang et al. 2024, "Self-Distillation
Bridges Distribution Gap in Language Model Fine-Tuning"), which is what the forgetting probe
measures.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from docent.engine import ChatRequest, Completion, Engine
from docent.progress import Progress, no_progress
from docent.prompts import (
    ANSWER_PREFIX,
    BEGIN_QUOTE,
    build_messages,
    format_answer,
    quote,
)
from eval.answer_cache import AnswerCache
from ingest.docstore import StoredChunk
from raft.dataset import Example
from raft.text import content_words
from serving.attribution import contains_phrase, final_answer, numbers

MAX_WORDS = 40
# Share of the restatement's content words that must come from the question or the quoted
# sentence: the rest is the model's own glue ("is called", "you can"), not new claims.
MIN_COVERAGE = 0.7
MAX_TOKENS = 72
CACHE_BATCH = 64  # answers generated, then kept, at a time
# Openings that give the answer without restating what was asked: no key into the context.
_NO_RESTATEMENT = re.compile(r"\s*(the\s+)?(answer|question|response)\b", re.IGNORECASE)
_MARKUP = re.compile(r"<|>|#|\*\*|\[|\]|DOCUMENT", re.IGNORECASE)


@dataclass(frozen=True)
class Restatement:
    """An accepted first sentence, or the reason it was refused."""

    sentence: str = ""
    reason: str = ""


def check_restatement(output: str, question: str, answer: str, evidence: str) -> Restatement:
    """Whether ``output``'s first sentence can open a training target: it states ``answer``,
    says nothing the question and the evidence sentence do not (no new number, mostly their
    words), and is plain prose (no markup, quote markers or answer line, not too long)."""
    first = output.split(BEGIN_QUOTE)[0].split(ANSWER_PREFIX)[0]
    sentence = final_answer(first.strip()).strip()
    if not sentence:
        return Restatement(reason="empty")
    if _MARKUP.search(sentence):
        return Restatement(reason="markup")
    if len(sentence.split()) > MAX_WORDS:
        return Restatement(reason="too_long")
    if _NO_RESTATEMENT.match(sentence):
        return Restatement(reason="no_restatement")
    if not contains_phrase(sentence, answer):
        return Restatement(reason="misses_answer")
    if not numbers(sentence) <= numbers(evidence) | numbers(question):
        return Restatement(reason="new_number")
    own = content_words(sentence)
    known = content_words(evidence) | content_words(question)
    if own and len(own & known) < MIN_COVERAGE * len(own):
        return Restatement(reason="unsupported_words")
    if not sentence.endswith((".", "!", "?")):
        sentence += "."
    return Restatement(sentence=sentence)


def own_words_target(restatement: str, evidence: str, answer: str) -> str:
    """The ``own_words`` target: the model's sentence, the verbatim quote, the answer line."""
    return format_answer(f"{restatement} {quote(evidence)}", answer)


def _report(progress: Progress, stage: str) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        progress(stage, done, total)

    return report


def rewrite_targets(
    examples: Sequence[Example],
    by_id: Mapping[str, StoredChunk],
    engine: Engine,
    progress: Progress = no_progress,
    cache: AnswerCache | None = None,
) -> tuple[list[Example], Counter[str]]:
    """Examples whose target is rewritten in the model's own words; an example whose model
    answer fails the checks is dropped and counted by reason (``own_words_<reason>``).
    Refusals keep their declining target, and are kept only with their question.

    The model answers from the oracle chunk alone, not the example's whole context: the
    phrasing is what is distilled, and without distractors it is right more often, from a
    third of the prompt (prefill is most of the cost on a CPU).

    With ``cache``, answers are kept batch by batch as they come: an interrupted build, a
    rebuild after a refresh or another recipe on the same questions asks only for the rest
    (on a 2-core AVX2 CPU the model's answers are most of a build's time)."""
    todo = [ex for ex in examples if ex.kind != "refusal" and ex.oracle_id in by_id]
    requests = [
        ChatRequest(messages=build_messages(ex.question, [by_id[ex.oracle_id]]),
                    max_tokens=MAX_TOKENS)
        for ex in todo
    ]
    outputs = _answers(engine, requests, [ex.id for ex in todo], cache,
                       _report(progress, "own-words targets"))
    verdicts = {
        ex.id: check_restatement(out.text, ex.question, ex.answer, str(ex.meta["quote"]))
        for ex, out in zip(todo, outputs, strict=True)
    }
    rejections: Counter[str] = Counter()
    kept: list[Example] = []
    for ex in examples:
        got = verdicts.get(ex.id, Restatement(reason="no_oracle_chunk"))
        if ex.kind == "refusal":
            # Kept with its question only, so refusals stay the share the settings ask for
            # (a build that drops two thirds of its answers must not triple its refusals).
            if verdicts.get(ex.id.removesuffix("-refusal"), got).sentence:
                kept.append(ex)
        elif got.sentence:
            ex.completion = own_words_target(got.sentence, str(ex.meta["quote"]), ex.answer)
            ex.meta["own_words"] = True
            kept.append(ex)
        else:
            rejections[f"own_words_{got.reason}"] += 1
    return kept, rejections


def _answers(
    engine: Engine,
    requests: list[ChatRequest],
    ids: list[str],
    cache: AnswerCache | None,
    progress: Callable[[int, int], None],
) -> list[Completion]:
    """The engine's answers to ``requests``, from ``cache`` where it holds them."""
    if cache is None:
        return engine.generate(requests, progress=progress)
    return cache.answers(engine.generate, list(zip(ids, requests, strict=True)), None,
                         "own_words", batch=CACHE_BATCH, progress=progress)
