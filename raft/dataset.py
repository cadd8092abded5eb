"""RAFT examples: oracle and distractor mix, refusal examples, splits by source document.

As in the paper: each example holds K distractors plus, in a fraction P of examples, the oracle
chunk (order shuffled); the other (1 - P) hold K + 1 distractors and keep the oracle's answer, so
the model also memorises the domain. Separately a small refusal fraction pairs a question with
unrelated chunks only and an answer that declines. Every random choice is drawn from a generator
seeded by (seed, question id), so a refresh reproduces unchanged examples exactly.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from docent.prompts import build_messages, decline_answer, normalise
from ingest.docstore import StoredChunk

SPLITS = ("train", "validation", "test")


@dataclass
class QAItem:
    """A verified question about one oracle chunk (from the teacher or from a human)."""

    qid: str
    question: str
    answer: str
    quote: str
    cot: str
    chunk_id: str
    origin: str = "teacher"  # "teacher" | "human" | "feedback"


@dataclass
class Example:
    id: str
    question: str
    context: list[StoredChunk]
    completion: str
    oracle_id: str
    has_oracle: bool
    kind: str  # "oracle" | "no_oracle" | "refusal"
    split: str
    source: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)

    def messages(self) -> list[dict[str, str]]:
        return [
            *build_messages(self.question, self.context),
            {"role": "assistant", "content": self.completion},
        ]

    def record(self, fmt: str) -> dict[str, Any]:
        msgs = self.messages()
        base: dict[str, Any] = {"id": self.id}
        if fmt == "completion":
            # TRL's conversational prompt-completion form: loss on the completion only.
            base.update(prompt=msgs[:-1], completion=msgs[-1:])
        else:
            base["messages"] = msgs
        base["meta"] = {
            "question": self.question,
            "answer": self.answer,
            "kind": self.kind,
            "oracle_chunk": self.oracle_id,
            "has_oracle": self.has_oracle,
            "context_chunks": [c.chunk_id for c in self.context],
            "source": self.source,
            "split": self.split,
            **self.meta,
        }
        return base


# Every validation question the build accepted, written before the targets were rewritten.
# `own_words` keeps only the questions the base model already answers right, so scoring
# adapters on the kept ones alone would favour base+RAG (run 8: 12 questions, 58% each).
VALIDATION_QUESTIONS = "validation-questions.jsonl"


def rng_for(seed: int, *keys: str) -> random.Random:
    digest = hashlib.sha256("\x1f".join([str(seed), *keys]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def assign_splits(
    sources: Sequence[str],
    seed: int,
    fractions: tuple[float, float, float],
    keep: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Whole source documents to train/validation/test: no source is in two splits.

    A first build shuffles the sources and cuts them by the fractions. A refresh passes the
    previous set's assignment as ``keep``: those documents stay where they were, so no
    validation or test document moves into training between two loop rounds (re-shuffling
    with three handbook documents more moved 3 of its 11 held-out documents into training and
    3 trained-on ones out), and a new document draws its split from a hash of its own name,
    whatever else was added with it."""
    if keep:
        return {src: keep[src] if keep.get(src) in SPLITS else _hashed_split(
            src, seed, fractions) for src in sorted(set(sources))}
    ordered = sorted(set(sources))
    rng_for(seed, "splits").shuffle(ordered)
    n = len(ordered)
    n_test = max(1, round(fractions[2] * n)) if n >= 3 and fractions[2] > 0 else 0
    n_val = max(1, round(fractions[1] * n)) if n >= 3 and fractions[1] > 0 else 0
    out = {}
    for i, src in enumerate(ordered):
        out[src] = "test" if i < n_test else "validation" if i < n_test + n_val else "train"
    return out


def _hashed_split(source: str, seed: int, fractions: tuple[float, float, float]) -> str:
    digest = hashlib.sha256("\x1f".join([str(seed), "split", source]).encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if u < fractions[2] else "validation" if u < fractions[2] + fractions[1] \
        else "train"


class DistractorPicker:
    """Hard negatives (top retrieval hits from other documents) mixed with random chunks from
    other documents; never the oracle, never two chunks with the same text."""

    def __init__(
        self,
        chunks: Sequence[StoredChunk],
        search: Callable[[str, int], list[str]] | None,
        hard_fraction: float,
    ) -> None:
        self.chunks = list(chunks)
        self.by_id = {c.chunk_id: c for c in self.chunks}
        self.search = search  # question, k -> chunk ids, best first
        self.hard_fraction = hard_fraction

    def pick(
        self,
        question: str,
        oracle: StoredChunk,
        k: int,
        rng: random.Random,
        exclude_answer: str | None = None,
        hard: bool = True,
    ) -> list[StoredChunk]:
        chosen: list[StoredChunk] = []
        texts = {normalise(oracle.text)}

        def ok(c: StoredChunk) -> bool:
            if c.chunk_id == oracle.chunk_id or c.doc_id == oracle.doc_id:
                return False
            if normalise(c.text) in texts:
                return False
            return not (exclude_answer and normalise(exclude_answer) in normalise(c.text))

        n_hard = round(k * self.hard_fraction) if hard and self.search else 0
        if n_hard and self.search is not None:
            for cid in self.search(question, 4 * k + 5):
                cand = self.by_id.get(cid)
                if cand is not None and ok(cand):
                    chosen.append(cand)
                    texts.add(normalise(cand.text))
                    if len(chosen) == n_hard:
                        break
        pool = [c for c in self.chunks if ok(c)]
        rng.shuffle(pool)
        for cand in pool:
            if len(chosen) == k:
                break
            if normalise(cand.text) not in texts:
                chosen.append(cand)
                texts.add(normalise(cand.text))
        return chosen


@dataclass
class MixSettings:
    distractors: int = 4
    p_oracle: float = 0.8
    refusal_fraction: float = 0.05
    seed: int = 0
    refusal_related: bool = False  # refusals see hard negatives, not unrelated chunks only


def make_examples(
    item: QAItem, oracle: StoredChunk, picker: DistractorPicker, mix: MixSettings, split: str
) -> list[Example]:
    """The RAFT example for one question, plus a refusal example for a fraction of them."""
    rng = rng_for(mix.seed, item.qid)
    has_oracle = rng.random() < mix.p_oracle
    k = mix.distractors if has_oracle else mix.distractors + 1
    distractors = picker.pick(item.question, oracle, k, rng, exclude_answer=item.answer)
    context = [oracle, *distractors] if has_oracle else distractors
    rng.shuffle(context)
    source = str(oracle.metadata.get("source", ""))
    examples = [
        Example(
            id=item.qid,
            question=item.question,
            context=context,
            completion=item.cot,
            oracle_id=oracle.chunk_id,
            has_oracle=has_oracle,
            kind="oracle" if has_oracle else "no_oracle",
            split=split,
            source=source,
            answer=item.answer,
            meta={"origin": item.origin, "quote": item.quote},
        )
    ]
    if rng.random() < mix.refusal_fraction:
        # None holding the answer: learn to decline. Unrelated chunks teach the easy case;
        # related ones (hard negatives) the one serving meets, an unanswerable question whose
        # retrieval still returns chunks on its topic.
        unrelated = picker.pick(
            item.question, oracle, mix.distractors + 1, rng, exclude_answer=item.answer,
            hard=mix.refusal_related,
        )
        examples.append(
            Example(
                id=f"{item.qid}-refusal",
                question=item.question,
                context=unrelated,
                completion=decline_answer(),
                oracle_id=oracle.chunk_id,
                has_oracle=False,
                kind="refusal",
                split=split,
                source=source,
                answer="unanswerable",
                meta={"origin": item.origin},
            )
        )
    return examples
