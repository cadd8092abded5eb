"""The improvement loop: new documents and user feedback become a better served model.

One round, each stage recorded in ``<workspace>/loop/rNNNN/round.json`` (``docent.lineage``):

    ingest     refresh the index for the given paths (only changed chunks are embedded)
    raft       refresh the RAFT set: only new or changed chunks get new questions; reviewers'
               corrections from the API join the human questions
    sft        LoRA fine-tuning on it (``docent train``)
    score_sft  validation accuracy (retrieval + the adapter, as users are answered), the
               unanswerable questions it declines, and the forgetting probe
    pairs      (with ``dpo``) preference pairs: users' ratings and corrections, and the SFT
               adapter's own wrong or ungrounded answers on the training split against the
               verified targets
    dpo        preference tuning (TRL's DPOTrainer) on top of the SFT adapter, its reference
    score_dpo  the same scores for the DPO adapter
    gate       a candidate goes live only if it beats the live adapter and base+RAG by the
               margin on validation and its probe is within the tolerance of the base model's
    promote    the registry's promoted adapter changes (merged weights written where vLLM runs
               them merged) and a running server follows it

Every stage's work survives the process: the index is published atomically, RAFT builds and
eval answers are cached per item, training checkpoints, adapters are renamed into place when
complete, and the round record is rewritten at each stage boundary. Running the same request
again after a crash (SIGKILL included) resumes the interrupted round at the stage it was in.
One round runs at a time per workspace (a file lock, dropped by the kernel if its holder dies).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from docent.engine import Engine
from docent.errors import ConfigError, DocentError
from docent.lineage import RoundRecord, RoundStore, StageRecord, now
from docent.progress import Progress, no_progress
from docent.settings import DocentSettings
from docent.workspace import Workspace
from ingest.embedder import Embedder

log = logging.getLogger(__name__)
STAGES = ("ingest", "raft", "sft", "score_sft", "pairs", "dpo", "score_dpo", "gate", "promote")
# What a loop request may change about training: the train_* settings, named without prefix.
TRAIN_KEYS = ("epochs", "max_steps", "lr", "lora_r", "lora_alpha", "batch_size", "grad_accum")
DONE = ("done", "skipped")


@dataclass(frozen=True)
class LoopRequest:
    """What one round is asked to do. Equal requests resume an interrupted round."""

    paths: list[str] = field(default_factory=list)  # files or folders to refresh; [] = none
    collection: str = "default"
    qa_file: str | None = None  # human questions, for the first RAFT set only
    feedback: bool = True  # use the API's ratings and corrections
    dpo: bool | None = None  # None: settings.loop_dpo
    force: bool = False  # promote the best candidate even when the gate says no
    even_if_unchanged: bool = False  # train even when no document or feedback changed
    train: dict[str, Any] = field(default_factory=dict)  # e.g. {"lr": 5e-4, "max_steps": 40}

    def __post_init__(self) -> None:
        unknown = sorted(set(self.train) - set(TRAIN_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown training option(s) {unknown} for the loop: use {', '.join(TRAIN_KEYS)}"
            )

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["paths"] = [str(Path(p).expanduser().resolve()) for p in self.paths]
        return data


@dataclass
class _Context:
    settings: DocentSettings
    train_settings: DocentSettings
    request: LoopRequest
    record: RoundRecord
    store: RoundStore
    engine: Engine | None
    embedder: Embedder
    progress: Progress
    on_promote: Callable[[str | None], object] | None

    @property
    def ws(self) -> Workspace:
        return Workspace(self.settings.workspace)

    @property
    def folder(self) -> Path:
        return self.store.folder(self.record.id)


def loop_store(settings: DocentSettings) -> RoundStore:
    return RoundStore(Workspace(settings.workspace).root / "loop")


def run_loop(
    settings: DocentSettings,
    request: LoopRequest,
    *,
    engine: Engine | None = None,
    embedder: Embedder | None = None,
    progress: Progress = no_progress,
    on_promote: Callable[[str | None], object] | None = None,
) -> RoundRecord:
    """Run (or resume) one round of the loop; returns its record. ``engine``: the engine every
    model call goes through (a server's); None builds what each stage needs. ``on_promote``
    is told the adapter that went live, so a server can switch to it at once."""
    store = loop_store(settings)
    with store.lock():
        record = _open_round(store, request)
        ctx = _Context(
            settings=settings,
            train_settings=settings.with_overrides(
                **{f"train_{k}": v for k, v in request.train.items()}
            ),
            request=request,
            record=record,
            store=store,
            engine=engine,
            embedder=embedder or Embedder.from_settings(settings),
            progress=progress,
            on_promote=on_promote,
        )
        try:
            for number, name in enumerate(STAGES):
                progress("loop", number, len(STAGES))
                _run_stage(ctx, name, STAGE_FUNCTIONS[name])
            progress("loop", len(STAGES), len(STAGES))
        except BaseException as exc:
            record.state = "failed"
            record.error = (
                str(exc) if isinstance(exc, DocentError) else (f"{type(exc).__name__}: {exc}")
            )
            record.finished = now()
            store.save(record)
            raise
        if record.state == "running":
            record.state = "succeeded"
        record.finished = now()
        store.save(record)
        return record


def _open_round(store: RoundStore, request: LoopRequest) -> RoundRecord:
    """The interrupted round to resume (same request), or a new one."""
    wanted = request.as_dict()
    latest = store.latest()
    if latest is not None and latest.state in ("running", "failed"):
        # We hold the lock, so the process that ran it is gone: it was cut off, or it failed.
        if latest.request == wanted:
            log.info("resuming loop round %s", latest.id)
            latest.state, latest.error, latest.finished = "running", None, None
            latest.pid = os.getpid()
            store.save(latest)
            return latest
        latest.state = "abandoned"
        latest.error = "cut off, and the next loop run asked for something else"
        latest.finished = now()
        store.save(latest)
    return store.new(wanted)


def _run_stage(ctx: _Context, name: str, fn: Callable[[_Context], StageRecord | None]) -> None:
    record = ctx.record
    stage = record.stages.setdefault(name, StageRecord())
    if stage.state in DONE:
        return
    if record.state == "unchanged":
        stage.state, stage.note = "skipped", "nothing changed since the last round"
        ctx.store.save(record)
        return
    stage.state, stage.started, stage.attempts = "running", now(), stage.attempts + 1
    ctx.store.save(record)
    started = time.perf_counter()
    try:
        outcome = fn(ctx)
    except BaseException:
        stage.state, stage.finished = "failed", now()
        stage.seconds = round(stage.seconds + time.perf_counter() - started, 1)
        ctx.store.save(record)
        raise
    if outcome is not None:
        stage.state, stage.note, stage.result = outcome.state, outcome.note, outcome.result
    else:
        stage.state = "done"
    stage.finished = now()
    stage.seconds = round(stage.seconds + time.perf_counter() - started, 1)
    ctx.store.save(record)


def _skip(note: str) -> StageRecord:
    return StageRecord(state="skipped", note=note)


def _done(result: dict[str, Any] | None = None, note: str | None = None) -> StageRecord:
    return StageRecord(state="done", note=note, result=result or {})


# Stages -------------------------------------------------------------------------------------
def _ingest(ctx: _Context) -> StageRecord:
    from ingest.pipeline import refresh_index
    from ingest.stores import live_version

    result: dict[str, Any] = {}
    note = None
    if ctx.request.paths:
        report = refresh_index(
            ctx.request.paths,
            ctx.settings,
            collection=ctx.request.collection,
            embedder=ctx.embedder,
            progress=ctx.progress,
        )
        result = report.as_dict()
    else:
        note = "no paths given: the index as it is"
    version = live_version(ctx.settings)
    if version is None:
        raise ConfigError(
            "the index is empty: give the loop the documents to learn (docent loop run PATH)"
        )
    lineage = ctx.record.lineage
    lineage["index_version"] = version
    lineage["feedback_rows"] = _feedback_count(ctx.settings)
    lineage["live_before"] = _promoted_name(ctx.settings)
    if not ctx.request.even_if_unchanged and _unchanged(ctx):
        ctx.record.state = "unchanged"
        note = (
            f"index {version} and the feedback are what round "
            f"{lineage['same_as']} trained on: nothing to learn (even_if_unchanged retrains)"
        )
    return _done(result, note)


def _unchanged(ctx: _Context) -> bool:
    lineage = ctx.record.lineage
    for previous in reversed(ctx.store.rounds()):
        if previous.id == ctx.record.id or previous.state not in ("succeeded", "unchanged"):
            continue
        same = previous.lineage.get("index_version") == lineage["index_version"] and (
            previous.lineage.get("feedback_rows") == lineage["feedback_rows"]
            or not ctx.request.feedback
        )
        if same:
            lineage["same_as"] = previous.lineage.get("same_as") or previous.id
        return same
    return False


def _raft(ctx: _Context) -> StageRecord:
    from raft import show
    from raft.build import BUILDING, build_raft_set, latest_manifest

    name = f"loop-{ctx.record.id}"
    raft_dir = ctx.ws.raft_dir
    folder = raft_dir / name
    note = None
    if not (folder / "manifest.json").exists():
        building = raft_dir / BUILDING
        resume = building.exists() and json.loads(building.read_text()).get("name") == name
        refresh = not resume and latest_manifest(raft_dir) is not None
        feedback = _export_corrections(ctx) if ctx.request.feedback and not resume else None
        if refresh and ctx.request.qa_file:
            note = "qa_file is used by the first RAFT set only: later rounds refresh the latest"
        build_raft_set(
            ctx.settings,
            name=None if resume else name,
            resume=resume,
            refresh=refresh,
            qa_file=None if (refresh or resume) else ctx.request.qa_file,
            feedback_file=feedback,
            engine=ctx.engine,
            embedder=ctx.embedder,
            progress=ctx.progress,
        )
    else:
        note = "reused: built before the round was cut off"
    manifest = show.load_manifest(folder)
    ctx.record.lineage["raft_set"] = name
    ctx.record.lineage["dataset_hash"] = manifest.get("dataset_hash")
    report = manifest.get("report") or {}
    keep = (
        "examples",
        "kinds",
        "chunks_generated",
        "chunks_reused",
        "questions_accepted",
        "human_questions",
        "seconds",
    )
    return _done({k: report.get(k) for k in keep}, note)


def _sft(ctx: _Context) -> StageRecord:
    from raft.adapters import AdapterRegistry
    from raft.train import RUNS, TRAINING, train_adapter

    name = f"loop-{ctx.record.id}-sft"
    registry = AdapterRegistry(ctx.ws.adapters_dir)
    ctx.record.lineage["sft"] = name
    if (registry.dir / name / "metadata.json").exists():
        return _done(_train_summary(registry.get(name).metadata), "reused: trained before")
    state = registry.dir / RUNS / TRAINING
    resume = state.exists() and json.loads(state.read_text()).get("name") == name
    result = train_adapter(
        ctx.train_settings,
        dataset=ctx.record.lineage["raft_set"],
        name=name,
        resume=resume,
        progress=ctx.progress,
    )
    return _done(
        _train_summary(registry.get(name).metadata),
        f"resumed from {result.resumed_from}" if result.resumed_from else None,
    )


def _train_summary(meta: dict[str, Any]) -> dict[str, Any]:
    result = meta.get("result") or {}
    keep = (
        "steps",
        "train_loss_first",
        "train_loss_last",
        "best_eval_loss",
        "seconds",
        "tokens_per_s",
        "resumed_from",
    )
    return {
        **{k: result.get(k) for k in keep},
        "examples": meta.get("examples"),
        "pairs": meta.get("pairs"),
    }


def _score_sft(ctx: _Context) -> StageRecord:
    return _score(ctx, "sft")


def _score_dpo(ctx: _Context) -> StageRecord:
    if not ctx.record.lineage.get("dpo"):
        return _skip("no DPO adapter this round")
    return _score(ctx, "dpo")


def _score(ctx: _Context, role: str) -> StageRecord:
    """Validation answers (recorded in the adapter's metadata), declines on unanswerable
    questions and the forgetting probe, for the round's ``role`` adapter and its rivals."""
    from eval.promotion import judge_candidate
    from eval.runner import run_probe
    from eval.validation import prepare_validation, recorded_score
    from raft.adapters import AdapterRegistry

    name = ctx.record.lineage[role]
    vset = prepare_validation(ctx.settings, ctx.record.lineage["raft_set"])
    decision = judge_candidate(
        ctx.settings,
        name,
        vset,
        engine=ctx.engine,
        embedder=ctx.embedder,
        progress=ctx.progress,
    )
    registry = AdapterRegistry(ctx.ws.adapters_dir)
    validation = (recorded_score(registry.get(name), vset) or {}).get("scores", {})
    scores = ctx.record.scores
    scores["validation_questions"] = vset.questions
    scores["base+rag"] = {**scores.get("base+rag", {}), "accuracy": decision.base_rag}
    if decision.promoted_name is not None:
        scores["live"] = {"name": decision.promoted_name, "accuracy": decision.promoted}
    if "probe_base" not in scores:
        scores["probe_base"] = _mean(
            run_probe(
                ctx.settings,
                None,
                limit=ctx.settings.probe_questions,
                max_tokens=ctx.settings.validation_max_tokens,
                engine=ctx.engine,
                progress=ctx.progress,
            )
        )
    mine = {
        "name": name,
        "accuracy": decision.candidate,
        "validation": {
            k: validation.get(k)
            for k in (
                "accuracy",
                "f1",
                "quotes_grounded",
                "answers_with_citation",
                "ungrounded_answers",
                "answer_rate",
            )
        },
        "probe": _mean(
            run_probe(
                ctx.settings,
                name,
                limit=ctx.settings.probe_questions,
                max_tokens=ctx.settings.validation_max_tokens,
                engine=ctx.engine,
                progress=ctx.progress,
            )
        ),
        "gate": decision.as_dict(),  # against accuracy alone; the gate stage adds the probe
    }
    declines = _declines(ctx, name)
    if declines:
        mine["declined_unanswerable"] = declines["raft+rag"]
        scores["base+rag"]["declined_unanswerable"] = declines["base+rag"]
    scores[role] = mine
    return _done({k: mine[k] for k in ("accuracy", "probe")})


def _declines(ctx: _Context, adapter: str) -> dict[str, float]:
    """How often base+RAG and ``adapter`` decline the unanswerable questions of the RAFT set's
    question file (none: {}). They are never trained on, and the gate does not look at them:
    they say whether tuning taught the model to answer what the documents do not say."""
    from eval.runner import run_eval
    from raft import show

    manifest = show.load_manifest(ctx.ws.raft_dir / ctx.record.lineage["raft_set"])
    qa_file = manifest.get("qa_file")
    if not qa_file or not Path(qa_file).exists():
        return {}
    rows = [
        json.loads(line) for line in Path(qa_file).read_text("utf-8").splitlines() if line.strip()
    ]
    unanswerable = [r for r in rows if not r.get("answerable", True)]
    if not unanswerable:
        return {}
    path = ctx.folder / "unanswerable.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in unanswerable), "utf-8")
    result = run_eval(
        ctx.settings,
        path,
        systems=("base+rag", "raft+rag"),
        adapter=adapter,
        split=None,
        forgetting=False,
        max_tokens=ctx.settings.validation_max_tokens,
        engine=ctx.engine,
        embedder=ctx.embedder,
        progress=ctx.progress,
    )
    return {s: result.systems[s]["declined_unanswerable"] for s in ("base+rag", "raft+rag")}


def _pairs(ctx: _Context) -> StageRecord:
    wants = ctx.settings.loop_dpo if ctx.request.dpo is None else ctx.request.dpo
    if not wants:
        return _skip("preference tuning is off for this round")
    path = ctx.folder / "pairs.jsonl"
    result = collect_pairs(
        ctx.settings,
        ctx.record.lineage["sft"],
        ctx.record.lineage["raft_set"],
        path,
        engine=ctx.engine,
        feedback=ctx.request.feedback,
        progress=ctx.progress,
    )
    ctx.record.lineage["pairs"] = {
        "file": str(path),
        "sha256": result["sha256"],
        "count": result["count"],
    }
    return _done(result)


def collect_pairs(
    settings: DocentSettings,
    sft: str,
    dataset: str,
    path: Path,
    *,
    engine: Engine | None = None,
    feedback: bool = True,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Preference pairs for DPO on top of adapter ``sft``, written to ``path``: users'
    ratings and corrections first, then the adapter's own wrong or ungrounded answers to RAFT
    set ``dataset``'s training questions against their verified targets. Returns counts by
    origin, why rows gave no pair, and the file's sha256."""
    from raft.preferences import auto_pairs, feedback_pairs, model_wrong_answer, write_pairs

    ws = Workspace(settings.workspace)
    raft_folder = ws.raft_dir / dataset
    with engine_for(settings, sft, engine) as (live, adapter):
        auto, auto_skipped = auto_pairs(
            settings,
            raft_folder,
            live,
            adapter,
            progress=lambda done, total: progress("pairs", done, total),
        )
        users: list[dict[str, Any]] = []
        user_skipped: dict[str, int] = {}
        store = _serving_store(settings) if feedback else None
        if store is not None:
            try:
                users, skipped = feedback_pairs(
                    store,
                    raft_folder,
                    wrong_answer=model_wrong_answer(live, adapter, seed=settings.seed),
                )
            finally:
                store.close()
            user_skipped = dict(skipped)
    pairs = [*users, *auto][: settings.dpo_max_pairs]
    digest = write_pairs(pairs, path)
    by_origin: dict[str, int] = {}
    for pair in pairs:
        by_origin[pair["origin"]] = by_origin.get(pair["origin"], 0) + 1
    return {
        "count": len(pairs),
        "by_origin": by_origin,
        "sha256": digest,
        "file": str(path),
        "auto_skipped": dict(auto_skipped),
        "feedback_skipped": user_skipped,
    }


@contextmanager
def engine_for(
    settings: DocentSettings, adapter: str, given: Engine | None = None
) -> Iterator[tuple[Engine, str | None]]:
    """An engine answering with ``adapter`` and the adapter name its requests carry: the
    ``given`` one (the adapter loaded as LoRA), or one built for it (merged weights where the
    engine's LoRA path is slow) and closed after."""
    from raft.adapters import AdapterRegistry
    from raft.merge import engine_for_adapter

    info = AdapterRegistry(Workspace(settings.workspace).adapters_dir).get(adapter)
    if given is not None:
        given.add_adapter(info.name, str(info.path))
        yield given, info.name
        return
    engine, request_adapter = engine_for_adapter(settings, info)
    try:
        yield engine, request_adapter
    finally:
        engine.close()


def _dpo(ctx: _Context) -> StageRecord:
    from raft.adapters import AdapterRegistry
    from raft.dpo import DPO_TRAINING, train_dpo
    from raft.train import RUNS

    pairs = ctx.record.lineage.get("pairs")
    if not pairs:
        return _skip("preference tuning is off for this round")
    if not pairs["count"]:
        return _skip(
            "no preference pairs: the SFT adapter answered every training question "
            "right and grounded, and no user rated an answer"
        )
    name = f"loop-{ctx.record.id}-dpo"
    ctx.record.lineage["dpo"] = name
    registry = AdapterRegistry(ctx.ws.adapters_dir)
    if (registry.dir / name / "metadata.json").exists():
        return _done(_train_summary(registry.get(name).metadata), "reused: trained before")
    state = registry.dir / RUNS / DPO_TRAINING
    if state.exists() and json.loads(state.read_text()).get("name") == name:
        result = train_dpo(ctx.train_settings, resume=True, progress=ctx.progress)
    else:
        result = train_dpo(
            ctx.train_settings,
            sft=ctx.record.lineage["sft"],
            pairs=Path(pairs["file"]),
            name=name,
            progress=ctx.progress,
        )
    return _done(
        _train_summary(registry.get(name).metadata),
        f"resumed from {result.resumed_from}" if result.resumed_from else None,
    )


def _gate(ctx: _Context) -> StageRecord:
    from eval.promotion import gate_decision

    scores = ctx.record.scores
    decisions = {}
    for role in ("sft", "dpo"):
        mine = scores.get(role)
        if not mine:
            continue
        judged = mine["gate"]
        decisions[role] = gate_decision(
            judged["candidate"],
            judged["base_rag"],
            judged["promoted"],
            ctx.settings.promote_margin,
            candidate_name=mine["name"],
            promoted_name=judged["promoted_name"],
            probe=mine["probe"],
            probe_base=scores["probe_base"],
            tolerance=ctx.settings.forgetting_tolerance,
        )
    passing = [role for role, d in decisions.items() if d.promote]
    chosen: str | None = None
    forced = False
    if passing:
        # The better validation accuracy; on a tie the simpler adapter (SFT).
        chosen = max(passing, key=lambda r: (decisions[r].candidate, r == "sft"))
    elif ctx.request.force and decisions:
        chosen = max(decisions, key=lambda r: (decisions[r].candidate, r == "sft"))
        forced = True
    if chosen is not None:
        reason = decisions[chosen].reason
        if forced:
            reason = gate_decision(
                decisions[chosen].candidate,
                decisions[chosen].base_rag,
                decisions[chosen].promoted,
                ctx.settings.promote_margin,
                force=True,
                candidate_name=scores[chosen]["name"],
                promoted_name=decisions[chosen].promoted_name,
                probe=scores[chosen]["probe"],
                probe_base=scores["probe_base"],
                tolerance=ctx.settings.forgetting_tolerance,
            ).reason
    else:
        reason = "; ".join(f"{role}: {d.reason}" for role, d in decisions.items())
    ctx.record.decision = {
        "promote": chosen is not None,
        "adapter": scores[chosen]["name"] if chosen else None,
        "role": chosen,
        "forced": forced,
        "reason": reason,
        "candidates": {role: d.as_dict() for role, d in decisions.items()},
    }
    return _done({"promote": chosen is not None, "adapter": ctx.record.decision["adapter"]})


def _promote(ctx: _Context) -> StageRecord:
    from raft.merge import merge_if_served_merged
    from raft.registry_store import open_registry

    decision = ctx.record.decision
    if not decision.get("promote"):
        ctx.record.lineage["promoted"] = None
        return _skip(f"not promoted: {decision.get('reason')}")
    name = decision["adapter"]
    info = open_registry(ctx.settings).promote(name, ctx.settings.generator)
    merged = merge_if_served_merged(info, ctx.settings)
    ctx.record.lineage["promoted"] = name
    if ctx.on_promote is not None:
        ctx.on_promote(name)
    return _done({"adapter": name, "merged": str(merged) if merged else None})


STAGE_FUNCTIONS: dict[str, Callable[[_Context], StageRecord | None]] = {
    "ingest": _ingest,
    "raft": _raft,
    "sft": _sft,
    "score_sft": _score_sft,
    "pairs": _pairs,
    "dpo": _dpo,
    "score_dpo": _score_dpo,
    "gate": _gate,
    "promote": _promote,
}


# Helpers ------------------------------------------------------------------------------------
def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _promoted_name(settings: DocentSettings) -> str | None:
    from raft.registry_store import open_registry

    info = open_registry(settings).promoted()
    return info.name if info else None


def _serving_store(settings: DocentSettings) -> Any:
    """The API's store of answers and feedback: the Postgres store's, or the SQLite file if a
    server ever ran on this workspace (else None)."""
    from serving.store import open_serving_store

    folder = Workspace(settings.workspace).root / "serving"
    if settings.uses_postgres or (folder / "serving.db").exists():
        return open_serving_store(settings, folder)
    return None


def _feedback_count(settings: DocentSettings) -> int:
    store = _serving_store(settings)
    if store is None:
        return 0
    try:
        return len(store.feedback())
    finally:
        store.close()


def _export_corrections(ctx: _Context) -> Path | None:
    """Reviewers' corrections in the --qa-file format, beside the round's record."""
    store = _serving_store(ctx.settings)
    if store is None:
        return None
    try:
        return store.export_corrections(ctx.folder / "feedback.jsonl")  # type: ignore[no-any-return]
    finally:
        store.close()
