"""Metric functions: retrieval ranks, answer matching, grounding. Pure functions on plain
values, so each can be checked on hand-made cases.

Answer normalisation follows SQuAD's evaluation script (lowercase, punctuation and the
articles a/an/the removed, whitespace collapsed), with Unicode letters kept and accents and
compatibility forms folded (NFKD), so "Café" and "cafe" match. It lives in
``serving.attribution`` with ``final_answer``, because serving attributes answers to
sentences by the same rules eval scores them with.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from serving.attribution import final_answer, normalize_answer


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(bool(pred) and any(pred == normalize_answer(g) for g in golds if g.strip()))


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """The best token-overlap F1 against any gold answer (SQuAD)."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        ref = normalize_answer(gold).split()
        if not pred or not ref:
            continue
        common = sum((Counter(pred) & Counter(ref)).values())
        if common == 0:
            continue
        precision, recall = common / len(pred), common / len(ref)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def gold_contained(prediction: str, golds: Sequence[str]) -> float:
    """1 if a normalised gold answer appears in the normalised prediction, on word bounds
    ("72 hours" is in "links last 72 hours", "7" is not in "72")."""
    pred = f" {normalize_answer(prediction)} "
    for gold in golds:
        ref = normalize_answer(gold)
        if ref and f" {ref} " in pred:
            return 1.0
    return 0.0


def final_answer_scores(output: str, golds: Sequence[str]) -> tuple[float, float, float]:
    """Exact match, token F1 and gold containment (the headline accuracy) of what ``output``
    commits to (``final_answer``): the ``<ANSWER>:`` line, or the first sentence without one.
    A gold the output mentions only in passing ("... or maybe 72 hours") does not count."""
    answer = final_answer(output)
    return exact_match(answer, golds), token_f1(answer, golds), gold_contained(answer, golds)


# Retrieval --------------------------------------------------------------------------------
def first_relevant_rank(ranked: Sequence[str], relevant: str) -> int | None:
    """1-based rank of the first item equal to ``relevant`` (a gold source), or None."""
    for rank, item in enumerate(ranked, start=1):
        if item == relevant:
            return rank
    return None


def recall_at(ranked: Sequence[str], relevant: str, k: int) -> float:
    rank = first_relevant_rank(ranked, relevant)
    return float(rank is not None and rank <= k)


def reciprocal_rank(ranked: Sequence[str], relevant: str) -> float:
    rank = first_relevant_rank(ranked, relevant)
    return 1.0 / rank if rank else 0.0


def ndcg_at(ranked: Sequence[str], relevant: str, k: int = 10) -> float:
    """Binary relevance: every chunk of the gold source counts; the ideal ranking puts all
    of them first (as many as there are in the list, at most k)."""
    gains = [1.0 if item == relevant else 0.0 for item in ranked[:k]]
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
    n_relevant = min(sum(1 for item in ranked if item == relevant), k)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(n_relevant))
    return dcg / ideal if ideal else 0.0


# Grounding --------------------------------------------------------------------------------
def quote_found(quote: str, chunks: Sequence[str]) -> bool:
    """A quoted span is grounded when it appears verbatim (whitespace-insensitively) in one
    of the chunks the model was given."""
    needle = " ".join(quote.split())
    return bool(needle) and any(needle in " ".join(c.split()) for c in chunks)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
