"""Reciprocal rank fusion (Cormack et al. 2009): robust to the different score scales of
BM25 and cosine similarity, which is why it is the default way to combine them."""

from __future__ import annotations

from collections.abc import Sequence


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[int]], k: int = 60
) -> list[tuple[int, float]]:
    """Ids with their fused score ``sum(1 / (k + rank))``, best first (ties: first seen)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])


def distribution_based_score_fusion(
    scored: Sequence[Sequence[tuple[int, float]]],
) -> list[tuple[int, float]]:
    """Distribution-based score fusion (as in Qdrant): each list's scores are scaled by its own
    mean ± 3 standard deviations, then summed. Unlike RRF it keeps *how much* better a hit is:
    a BM25 hit on an exact error code far above the rest is not out-voted by near-ties in the
    dense list."""
    fused: dict[int, float] = {}
    order: list[int] = []
    for hits in scored:
        if not hits:
            continue
        values = [s for _, s in hits]
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
        low, high = mean - 3 * std, mean + 3 * std
        span = high - low
        for item, score in hits:
            norm = 0.5 if span <= 0 else min(1.0, max(0.0, (score - low) / span))
            if item not in fused:
                order.append(item)
            fused[item] = fused.get(item, 0.0) + norm
    return sorted(((i, fused[i]) for i in order), key=lambda kv: -kv[1])
