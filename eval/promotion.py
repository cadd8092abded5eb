"""The promotion gate: a new adapter goes live only when its answers are better.

A candidate must beat both the promoted adapter and base+RAG (what serving answers with when
no adapter is promoted) on validation accuracy by ``promote_margin``; otherwise the live
adapter stays and the decision says why, with the three figures. ``force`` promotes anyway
and says so. Promotion itself (registry and merged weights) is the caller's job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from docent.engine import Engine
from docent.errors import ConfigError
from docent.progress import Progress, no_progress
from docent.settings import DocentSettings
from eval.validation import (
    ValidationSet,
    known_base_rag,
    record_score,
    recorded_score,
    score_validation,
)
from ingest.embedder import Embedder
from raft.adapters import AdapterError, AdapterInfo, AdapterRegistry
from raft.registry_store import open_registry

_EPS = 1e-9  # accuracies are fractions of a few dozen questions: no real gap is this small


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    forced: bool
    reason: str
    candidate: float
    base_rag: float
    promoted: float | None
    promoted_name: str | None
    margin: float
    probe: float | None = None  # general-knowledge probe accuracy, when the probe was asked
    probe_base: float | None = None
    tolerance: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def gate_decision(
    candidate: float,
    base_rag: float,
    promoted: float | None,
    margin: float,
    *,
    force: bool = False,
    candidate_name: str = "the new adapter",
    promoted_name: str | None = None,
    probe: float | None = None,
    probe_base: float | None = None,
    tolerance: float | None = None,
) -> GateDecision:
    """Promote when ``candidate`` beats the better of ``base_rag`` and ``promoted`` (None: no
    adapter promoted) by at least ``margin`` and by more than nothing and, when the forgetting
    probe was asked (``probe``, ``probe_base`` and ``tolerance`` given), its probe accuracy is
    at most ``tolerance`` below the base model's; ``force`` promotes regardless. All figures
    are fractions in [0, 1]."""
    checked = [("candidate", candidate), ("base+RAG", base_rag), ("margin", margin)]
    checked += [(label, value) for label, value in (
        ("probe", probe), ("base probe", probe_base), ("tolerance", tolerance)
    ) if value is not None]
    for label, value in checked:
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{label} {value} must be a fraction between 0 and 1")
    if promoted is not None and not 0.0 <= promoted <= 1.0:
        raise ConfigError(f"promoted accuracy {promoted} must be a fraction between 0 and 1")
    live = f"promoted {promoted_name or 'adapter'}"
    rivals = [("base+RAG", base_rag)] + ([(live, promoted)] if promoted is not None else [])
    bar_label, bar = max(rivals, key=lambda rival: rival[1])
    gain = candidate - bar
    beats = gain > _EPS and gain >= margin - _EPS
    figures = (
        f"validation accuracy {candidate_name} {_pct(candidate)}, "
        + (f"{live} {_pct(promoted)}" if promoted is not None else "no adapter promoted")
        + f", base+RAG {_pct(base_rag)}"
    )
    needed = f"{_pct(bar + margin)} ({bar_label} + {100 * margin:.1f}-point margin)"
    forgets = ""
    if probe is not None and probe_base is not None and tolerance is not None:
        drop = probe_base - probe
        figures += f"; forgetting probe {_pct(probe)} vs base {_pct(probe_base)}"
        if drop > tolerance + _EPS:
            forgets = (f"it forgets too much (probe {100 * drop:.1f} points below the base "
                       f"model, tolerance {100 * tolerance:.1f})")
    stays = promoted_name or "base+RAG (no adapter)"
    if beats and not forgets:
        reason = f"{figures}: reaches {needed}"
    elif beats:
        reason = f"{figures}: reaches {needed} but {forgets}"
    else:
        reason = f"{figures}: short of {needed}"
    if not beats or forgets:
        reason += (", promoted anyway because of --force" if force
                   else f", so {stays} stays live; --force promotes it anyway")
    beats = beats and not forgets
    return GateDecision(
        promote=beats or force,
        forced=force and not beats,
        reason=reason,
        candidate=candidate,
        base_rag=base_rag,
        promoted=promoted,
        promoted_name=promoted_name,
        margin=margin,
        probe=probe,
        probe_base=probe_base,
        tolerance=tolerance,
    )


def _live_adapter(registry: AdapterRegistry, settings: DocentSettings) -> AdapterInfo | None:
    """The promoted adapter, if it can serve this generator (one trained on another base
    cannot answer, so it is no rival)."""
    info = registry.promoted()
    if info is None:
        return None
    try:
        registry.check_base(info, settings.generator)
    except AdapterError:
        return None
    return info


def judge_candidate(
    settings: DocentSettings,
    name: str,
    vset: ValidationSet,
    *,
    force: bool = False,
    base_rag: float | None = None,
    engine: Engine | None = None,
    embedder: Embedder | None = None,
    progress: Progress = no_progress,
) -> GateDecision:
    """Score adapter ``name``, the promoted adapter and base+RAG on ``vset`` (reusing scores
    recorded under the same validation key), record them in the adapters' metadata, and
    decide whether ``name`` may go live. Nothing is promoted here."""
    registry = open_registry(settings)
    candidate = registry.get(name)
    live = _live_adapter(registry, settings)
    if live is not None and live.name == name:
        live = None  # judged against itself it could never win: compare with base+RAG
    if base_rag is None:
        base_rag = known_base_rag(registry, vset)

    def score(adapter: str | None, systems: tuple[str, ...]) -> dict[str, dict[str, float]]:
        return score_validation(
            settings,
            vset,
            adapter=adapter,
            systems=systems,
            engine=engine,
            embedder=embedder,
            progress=progress,
        )

    mine = recorded_score(candidate, vset)
    if mine is None:
        scores = score(name, ("raft+rag",) if base_rag is not None else ("base+rag", "raft+rag"))
        if base_rag is None:
            base_rag = scores["base+rag"]["accuracy"]
        mine = record_score(registry, name, vset, scores["raft+rag"], base_rag)
    if base_rag is None:  # recorded before base+RAG was: score it now (answers are cached)
        base_rag = score(None, ("base+rag",))["base+rag"]["accuracy"]
    theirs = recorded_score(live, vset) if live is not None else None
    if live is not None and theirs is None:
        theirs = record_score(
            registry, live.name, vset, score(live.name, ("raft+rag",))["raft+rag"], base_rag
        )
    return gate_decision(
        float(mine["accuracy"]),
        base_rag,
        float(theirs["accuracy"]) if theirs is not None else None,
        settings.promote_margin,
        force=force,
        candidate_name=name,
        promoted_name=live.name if live is not None else None,
    )
