"""``docent tune``: a grid search over training settings, each candidate judged by its answers.

Every candidate (learning rate x epochs x LoRA rank by default; any ``train_*`` or ``raft_*``
setting with ``--grid``) is trained with ``raft.train.train_adapter`` and scored by validation
accuracy (``eval.validation``) on the same questions: the validation split of the tune's RAFT
set, asked with the tune's retrieval settings, so candidates compete on equal terms. A
``raft_*`` field needs its own RAFT set, built once per distinct combination from the same
documents, questions and splits. The grid stops early when the time budget cannot fit another
candidate, or when ``tune_patience`` candidates in a row fail to beat the best. The best
adapter keeps its scores in its metadata, the others are deleted unless ``keep_all``, and the
promotion gate (``eval.promotion``) says whether the best may go live.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import product
from pathlib import Path
from typing import Any

from docent.engine import Engine
from docent.errors import ConfigError
from docent.progress import Progress, no_progress
from docent.settings import DocentSettings
from docent.workspace import Workspace
from eval.promotion import GateDecision, judge_candidate
from eval.validation import (
    VALIDATION_MAX_TOKENS,
    known_base_rag,
    prepare_validation,
    record_score,
    score_validation,
)
from ingest.embedder import Embedder
from raft import show
from raft.adapters import AdapterError, AdapterRegistry
from raft.build import LATEST, build_raft_set
from raft.registry_store import open_registry
from raft.train import train_adapter

log = logging.getLogger(__name__)

# lr x epochs x rank: what moved answers most in the issue #14 trials on the 135M model.
DEFAULT_GRID: dict[str, list[str]] = {
    "train_lr": ["1e-3", "3e-4"],
    "train_epochs": ["1", "2"],
    "train_lora_r": ["16"],
}
SHORTCUTS = {"lr": "train_lr", "epochs": "train_epochs", "rank": "train_lora_r"}
TUNABLE = ("train_", "raft_")
FIXED = {"raft_split": "it moves documents between the train and validation splits"}
_EPS = 1e-9


@dataclass
class Candidate:
    number: int
    name: str
    overrides: dict[str, Any]
    dataset: str
    accuracy: float
    f1: float
    answer_rate: float
    steps: int
    best_eval_loss: float | None
    seconds: float
    kept: bool = True


@dataclass
class TuneResult:
    id: str
    folder: str
    dataset: str
    validation: dict[str, Any]
    axes: dict[str, list[Any]]
    planned: int
    base_rag: float
    candidates: list[Candidate] = field(default_factory=list)
    stopped: str = "the grid is done"
    best: str | None = None
    decision: GateDecision | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def best_candidate(self) -> Candidate | None:
        return next((c for c in self.candidates if c.name == self.best), None)


# The grid ---------------------------------------------------------------------------------
def _values(label: str, text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise ConfigError(f"{label}: no values; give one or more, comma-separated")
    return values


def grid_axes(
    specs: Sequence[str] = (),
    *,
    lr: str | None = None,
    epochs: str | None = None,
    rank: str | None = None,
) -> dict[str, list[str]]:
    """The grid's axes from ``--lr/--epochs/--rank`` lists (each defaulting to
    ``DEFAULT_GRID``) and repeatable ``--grid FIELD=V1,V2`` options, values still as text."""
    extra: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(
                f"--grid {spec!r}: write FIELD=VALUE[,VALUE...], e.g. --grid train_lr=1e-3,3e-4"
            )
        if name in extra:
            raise ConfigError(f"--grid {name} is given twice: list all its values in one option")
        extra[name] = _values(f"--grid {name}", text)
    axes: dict[str, list[str]] = {}
    for option, given in (("lr", lr), ("epochs", epochs), ("rank", rank)):
        name = SHORTCUTS[option]
        if given is not None and name in extra:
            raise ConfigError(f"--{option} and --grid {name} set the same axis: keep one")
        if given is not None:
            axes[name] = _values(f"--{option}", given)
        else:
            axes[name] = extra.pop(name, DEFAULT_GRID[name])
    return {**axes, **extra}


def _check_field(name: str) -> None:
    fields = DocentSettings.model_fields
    tunable = sorted(f for f in fields if f.startswith(TUNABLE) and f not in FIXED)
    if name not in fields:
        close = difflib.get_close_matches(name, tunable, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"--grid {name}: no such setting{hint}; candidates can vary: {', '.join(tunable)}"
        )
    if name in FIXED:
        raise ConfigError(
            f"--grid {name} cannot vary per candidate: {FIXED[name]}, so candidates would be "
            "scored on questions some of them trained on"
        )
    if not name.startswith(TUNABLE):
        raise ConfigError(
            f"--grid {name}: only train_* and raft_* settings vary per candidate (every "
            "candidate is scored with the same retrieval and generator); set it for the whole "
            f"run instead, e.g. DOCENT_{name.upper()}"
        )


def _reason(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        found = errors()
        if found:
            return str(found[0].get("msg", exc))
    return str(exc).splitlines()[0]


def expand_grid(settings: DocentSettings, axes: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Every combination of the axes, as validated settings overrides, in grid order (the
    last axis varies fastest). Where the rank varies and alpha does not, alpha follows the
    rank at the settings' alpha/r ratio, so the adapter's scale stays the same."""
    if not axes:
        raise ConfigError("the grid is empty: give --lr, --epochs, --rank or --grid values")
    columns: list[list[Any]] = []
    for name, texts in axes.items():
        _check_field(name)
        if not texts:
            raise ConfigError(f"--grid {name}: no values; give one or more, comma-separated")
        values: list[Any] = []
        for text in texts:
            try:
                value = getattr(settings.with_overrides(**{name: text}), name)
            except ValueError as exc:
                raise ConfigError(
                    f"--grid {name}: {text!r} is not a valid value ({_reason(exc)})"
                ) from exc
            if value not in values:
                values.append(value)
        columns.append(values)
    combos = [dict(zip(axes, combo, strict=True)) for combo in product(*columns)]
    if "train_lora_r" in axes and "train_lora_alpha" not in axes:
        ratio = settings.train_lora_alpha / settings.train_lora_r
        for combo in combos:
            combo["train_lora_alpha"] = max(1, round(ratio * combo["train_lora_r"]))
    for combo in combos:
        try:
            settings.with_overrides(**combo)
        except ValueError as exc:
            raise ConfigError(f"grid candidate {combo} is not valid: {_reason(exc)}") from exc
    return combos


# Stopping ---------------------------------------------------------------------------------
def fits_budget(elapsed_s: float, durations: Sequence[float], budget_s: float | None) -> bool:
    """Whether another candidate may start: expected to take as long as the slowest so far
    (epochs vary across the grid, so the mean would overrun), it must end within budget."""
    if budget_s is None:
        return True
    return elapsed_s + max(durations, default=0.0) <= budget_s


def stalled(accuracies: Sequence[float], patience: int) -> bool:
    """True once the last ``patience`` candidates each failed to beat the best before them."""
    best, since = -math.inf, 0
    for accuracy in accuracies:
        if accuracy > best + _EPS:
            best, since = accuracy, 0
        else:
            since += 1
    return since >= patience


# RAFT sets for raft_* candidates ----------------------------------------------------------
def raft_set_for(
    settings: DocentSettings,
    base: Path,
    overrides: dict[str, Any],
    embedder: Embedder,
    progress: Progress,
) -> str:
    """The RAFT set a candidate trains on: the tune's own, or one built with its raft_*
    values from the same documents, questions and seed (so the same splits)."""
    manifest = show.load_manifest(base)
    params = dict(manifest.get("params") or {})
    wanted = {k: v for k, v in overrides.items() if k.startswith("raft_")}
    if all(params.get(k) == v for k, v in wanted.items()):
        return base.name
    digest = hashlib.sha256(
        json.dumps([manifest.get("dataset_hash"), wanted], sort_keys=True).encode()
    ).hexdigest()[:8]
    name = f"{base.name[:60]}-tune-{digest}"
    raft_dir = base.parent
    if (raft_dir / name / "manifest.json").exists():
        return name  # built by an earlier tune from the same set and values
    # A tune's variant sets must not become the latest set `docent train` picks up.
    pointer = raft_dir / LATEST
    latest = pointer.read_text() if pointer.exists() else None
    try:
        build_raft_set(
            settings.with_overrides(**{**params, **wanted}),
            name=name,
            limit=manifest.get("limit"),
            qa_file=manifest.get("qa_file"),
            embedder=embedder,
            progress=progress,
        )
    finally:
        if latest is not None:
            tmp = raft_dir / f"{LATEST}.tmp"
            tmp.write_text(latest)
            os.replace(tmp, pointer)
    return name


# The search -------------------------------------------------------------------------------
def run_tune(
    settings: DocentSettings,
    axes: dict[str, list[str]],
    *,
    dataset: str | None = None,
    budget_minutes: float | None = None,
    keep_all: bool = False,
    promote: bool = True,
    force: bool = False,
    engine: Engine | None = None,
    embedder: Embedder | None = None,
    max_tokens: int = VALIDATION_MAX_TOKENS,
    progress: Progress = no_progress,
) -> TuneResult:
    """Train and score the grid's candidates, keep the best, and (``promote``) ask the gate
    whether it may go live; promoting it is the caller's job. The report goes to
    ``<workspace>/reports/tune-<time>/`` (report.md, accuracy.png, tune.json)."""
    from eval.tune_report import write_tune_report

    started = time.monotonic()
    combos = expand_grid(settings, axes)
    if budget_minutes is not None and budget_minutes <= 0:
        raise ConfigError(f"--budget-minutes must be positive, not {budget_minutes}")
    budget_s = budget_minutes * 60 if budget_minutes is not None else None
    ws = Workspace(settings.workspace).ensure()
    base = show.resolve(ws.raft_dir, dataset)
    vset = prepare_validation(settings, base.name, max_tokens)
    registry = open_registry(settings)
    embedder = embedder or Embedder.from_settings(settings)
    tune_id = f"tune-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    folder = ws.reports_dir / tune_id

    def score(adapter: str | None, system: str) -> dict[str, float]:
        return score_validation(
            settings,
            vset,
            adapter=adapter,
            systems=(system,),
            engine=engine,
            embedder=embedder,
            progress=progress,
        )[system]

    base_rag = known_base_rag(registry, vset)
    if base_rag is None:
        base_rag = score(None, "base+rag")["accuracy"]
    result = TuneResult(
        id=tune_id,
        folder=str(folder),
        dataset=base.name,
        validation={"questions": vset.questions, **vset.key},
        axes={k: list(dict.fromkeys(c[k] for c in combos)) for k in combos[0]},
        planned=len(combos),
        base_rag=base_rag,
    )
    durations: list[float] = []
    progress("tune", 0, len(combos))
    for number, overrides in enumerate(combos, start=1):
        if stalled([c.accuracy for c in result.candidates], settings.tune_patience):
            result.stopped = (
                f"early stop: {settings.tune_patience} candidates in a row did not beat the best"
            )
            break
        if not fits_budget(time.monotonic() - started, durations, budget_s):
            result.stopped = (
                f"time budget: another candidate would not end within {budget_minutes} min"
            )
            break
        began = time.monotonic()
        name = f"{tune_id}-c{number:02d}"
        trained_on = raft_set_for(settings, base, overrides, embedder, progress)
        trained = train_adapter(
            settings.with_overrides(**overrides), dataset=trained_on, name=name, progress=progress
        )
        scores = score(name, "raft+rag")
        record_score(registry, name, vset, scores, base_rag)
        registry.update_metadata(
            name, tune={"id": tune_id, "report": str(folder), "overrides": overrides}
        )
        durations.append(time.monotonic() - began)
        result.candidates.append(
            Candidate(
                number=number,
                name=name,
                overrides=overrides,
                dataset=trained_on,
                accuracy=scores["accuracy"],
                f1=scores["f1"],
                answer_rate=scores["answer_rate"],
                steps=trained.steps,
                best_eval_loss=trained.best_eval_loss,
                seconds=round(durations[-1], 1),
            )
        )
        log.info("candidate %s %s: validation accuracy %.3f", name, overrides, scores["accuracy"])
        _save(folder, result)  # a crash later still leaves what was learnt
        progress("tune", number, len(combos))
    if not result.candidates:
        raise ConfigError(
            f"no candidate fits the {budget_minutes}-minute budget (scoring base+RAG took "
            f"{time.monotonic() - started:.0f} s): raise --budget-minutes"
        )
    # Accuracy decides; on a few dozen questions ties are common, and F1 then tells which
    # answers came closer. The earlier candidate wins a full tie.
    best = max(result.candidates, key=lambda c: (c.accuracy, c.f1))
    result.best = best.name
    if promote:
        result.decision = judge_candidate(
            settings,
            best.name,
            vset,
            force=force,
            base_rag=base_rag,
            engine=engine,
            embedder=embedder,
            progress=progress,
        )
    _drop_losers(registry, result, keep_all)
    registry.update_metadata(
        best.name,
        tune={
            "id": tune_id,
            "report": str(folder),
            "overrides": best.overrides,
            "best_of": len(result.candidates),
        },
    )
    result.seconds = round(time.monotonic() - started, 1)
    write_tune_report(result, folder)
    return result


def _drop_losers(registry: AdapterRegistry, result: TuneResult, keep_all: bool) -> None:
    if keep_all:
        return
    for candidate in result.candidates:
        if candidate.name == result.best:
            continue
        try:
            registry.remove(candidate.name)
            candidate.kept = False
        except AdapterError as exc:  # promoted meanwhile, or in the rollback history
            log.warning("%s", exc)


def _save(folder: Path, result: TuneResult) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tune.json").write_text(json.dumps(result.as_dict(), indent=2, default=str))
