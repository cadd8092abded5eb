"""``docent raft build``: questions from chunks, verified CoT answers, RAFT examples, splits,
a versioned dataset folder with a manifest."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from docent.engine import ChatRequest, Engine, build_engine, resolve_engine_kind
from docent.errors import ConfigError, DocentError, EmptyIndexError
from docent.hardware import auto_dtype
from docent.progress import Progress, no_progress
from docent.prompts import squash
from docent.settings import DocentSettings
from docent.workspace import Workspace
from ingest.docstore import StoredChunk
from ingest.embedder import Embedder
from ingest.stores import AnyStore, open_store
from raft import answers, questions, rule_questions, spans
from raft.cache import ChunkResult, GenerationCache
from raft.dataset import (
    SPLITS,
    VALIDATION_QUESTIONS,
    DistractorPicker,
    Example,
    MixSettings,
    QAItem,
    assign_splits,
    make_examples,
    rng_for,
)
from raft.text import sentence_with

log = logging.getLogger(__name__)

PROMPT_VERSION = "1"  # bump when teacher prompts or checks change: the cache is keyed by it
LATEST = "LATEST"
BUILDING = "BUILDING.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")
RAFT_FIELDS = (
    "raft_questions_per_chunk",
    "raft_cot_format",
    "raft_refusal_related",
    "raft_distractors",
    "raft_p_oracle",
    "raft_refusal_fraction",
    "raft_hard_negatives",
    "raft_answer_style",
    "raft_format",
    "raft_split",
    "seed",
)


class RaftBuildError(DocentError):
    """A RAFT build cannot start or produced nothing usable."""


@dataclass
class BuildReport:
    name: str
    folder: str
    teacher: str
    index_version: str
    examples: dict[str, int] = field(default_factory=dict)  # per split
    kinds: dict[str, int] = field(default_factory=dict)  # oracle / no_oracle / refusal
    chunks_total: int = 0
    chunks_generated: int = 0
    chunks_reused: int = 0
    questions_generated: int = 0
    questions_accepted: int = 0
    human_questions: int = 0
    rejections: dict[str, int] = field(default_factory=dict)
    dropped_deleted_oracle: int = 0
    seconds: float = 0.0

    @property
    def oracle_fraction(self) -> float:
        raft = self.kinds.get("oracle", 0) + self.kinds.get("no_oracle", 0)
        return self.kinds.get("oracle", 0) / raft if raft else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "oracle_fraction": round(self.oracle_fraction, 4)}


def teacher_id(settings: DocentSettings) -> str:
    if resolve_engine_kind(settings) == "openai":
        return f"url:{settings.llm_url}#{settings.llm_model or 'default'}"
    return f"local:{settings.generator}"


def answer_style(settings: DocentSettings) -> str:
    """``rules`` (questions written by Docent's rules, no LLM) unless a remote teacher is
    given: the embedded 135M teacher got no question of its own accepted."""
    if settings.raft_answer_style != "auto":
        return settings.raft_answer_style
    return "teacher" if resolve_engine_kind(settings) == "openai" else "rules"


def _cache_path(raft_dir: Path, settings: DocentSettings) -> Path:
    key = json.dumps(
        {
            "teacher": teacher_id(settings),
            "prompts": PROMPT_VERSION,
            "n": settings.raft_questions_per_chunk,
            "style": answer_style(settings),
            # Rule questions change with the rules, not with a teacher.
            "rules": rule_questions.VERSION if answer_style(settings) == "rules" else None,
        },
        sort_keys=True,
    )
    return raft_dir / "cache" / f"gen-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"


def _select(
    chunks: list[StoredChunk], limit: int | None, seed: int, splits: dict[str, str],
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> list[StoredChunk]:
    """All chunks, or ``limit`` of them spread over the corpus (stable for a seed), shared
    between the splits as the split fractions say, at least one training chunk and, from two
    chunks on, one validation chunk: a small build still trains and can still be judged."""
    if limit is None or limit >= len(chunks):
        return chunks
    if limit <= 0:
        return []  # human questions only
    ranked = sorted(chunks, key=lambda c: hashlib.sha256(f"{seed}:{c.chunk_id}".encode()).digest())
    want = {"validation": round(limit * fractions[1]), "test": round(limit * fractions[2])}
    if limit >= 2:
        want["validation"] = max(1, want["validation"])
    want["train"] = max(1, limit - want["validation"] - want["test"])
    keep: set[str] = set()
    for split, n in want.items():
        keep.update(c.chunk_id for c in [c for c in ranked if splits[c.source] == split][:n])
    for c in ranked:  # a split with too few chunks leaves room for the others
        if len(keep) >= limit:
            break
        keep.add(c.chunk_id)
    return [c for c in chunks if c.chunk_id in keep]


def build_raft_set(
    settings: DocentSettings,
    *,
    limit: int | None = None,
    name: str | None = None,
    resume: bool = False,
    refresh: bool = False,
    qa_file: Path | str | None = None,
    feedback_file: Path | str | None = None,
    engine: Engine | None = None,
    embedder: Embedder | None = None,
    progress: Progress = no_progress,
) -> BuildReport:
    started = time.perf_counter()
    given_engine = engine  # the caller's (a teacher's, or the generator's), not one built here
    raft_dir = Workspace(settings.workspace).ensure().raft_dir
    raft_dir.mkdir(parents=True, exist_ok=True)
    settings, limit, name, qa_path, previous = _plan(
        raft_dir, settings, limit, name, resume, refresh, Path(qa_file) if qa_file else None
    )
    if settings.raft_distractors + 1 != settings.top_k:
        log.warning(
            "raft_distractors + 1 = %d but top_k = %d: training and serving will see a "
            "different number of context chunks",
            settings.raft_distractors + 1,
            settings.top_k,
        )
    store = open_store(settings)
    chunks = list(store.iter_chunks())
    if not chunks:
        raise EmptyIndexError("the index holds no chunks: run `docent ingest PATH` first")
    (raft_dir / BUILDING).write_text(
        json.dumps(
            {
                "name": name,
                "limit": limit,
                "qa_file": str(qa_path) if qa_path else None,
                "params": {f: getattr(settings, f) for f in RAFT_FIELDS},
                "teacher": teacher_id(settings),
                "started": _now(),
            }
        )
    )

    report = BuildReport(
        name=name,
        folder=str(raft_dir / name),
        teacher=teacher_id(settings),
        index_version=store.version,
        chunks_total=len(chunks),
    )
    cache = GenerationCache(_cache_path(raft_dir, settings))
    splits = assign_splits([c.source for c in chunks], settings.seed, settings.raft_split,
                           keep=_previous_splits(raft_dir, previous))
    targets = _select(chunks, limit, settings.seed, splits, settings.raft_split)
    todo = [c for c in targets if cache.get(c.chunk_id, c.text_hash) is None]
    report.chunks_generated, report.chunks_reused = len(todo), len(targets) - len(todo)
    embedder = embedder or Embedder.from_settings(settings)
    rules = answer_style(settings) == "rules"
    cross: list[QAItem] = []
    if todo or (rules and targets):
        owned = engine is None and not rules  # rule questions need no model
        engine = build_engine(settings) if owned else engine
        from retrieval import Retriever

        retriever = Retriever(settings, embedder=embedder)

        def leads_back(question: str, chunk: StoredChunk) -> bool:
            # A question its chunk answers should retrieve that chunk.
            hits = retriever.search(question, k=settings.raft_verify_k)
            return any(h.chunk_id == chunk.chunk_id for h in hits)

        try:
            if todo:
                _generate(engine, todo, cache, settings, progress, leads_back)
            if rules:
                cross = _cross_questions(
                    targets, [cache.get(c.chunk_id, c.text_hash) for c in targets], chunks,
                    leads_back, report,
                )
        finally:
            retriever.close()
            if owned and engine is not None:
                engine.close()

    results = [cache.get(c.chunk_id, c.text_hash) for c in targets]
    items, rejections = _collect(results, report)
    items += cross
    if cross:
        rejections.update(report.rejections)  # the cross questions' own rejections
    human, qa_splits, human_rejections = _human_items(qa_path, chunks) if qa_path else ([], {}, {})
    if feedback_file is not None:
        # Reviewers' corrections from the API (`/v1/feedback`), in the --qa-file format.
        if not Path(feedback_file).exists():
            raise ConfigError(f"--feedback {feedback_file} does not exist")
        corrected, _, feedback_rejections = _human_items(Path(feedback_file), chunks)
        human = [*human, *corrected]
        human_rejections = Counter(human_rejections) + Counter(
            {f"feedback_{k}": v for k, v in feedback_rejections.items()}
        )
    report.human_questions = len(human)
    rejections.update(human_rejections)
    # A cross question repeats another chunk's question on purpose (same question, evidence
    # in other words), so duplicates are removed among the others and among cross ones apart.
    cross_items = [i for i in items if i.origin == "rules:cross"]
    items = [i for i in items if i.origin != "rules:cross"]
    items = _dedupe([*human, *items], embedder, rejections)
    items += _dedupe(cross_items, embedder, rejections)
    by_id = {c.chunk_id: c for c in chunks}
    for item in list(items):
        problems = answers.check_cot(item.cot, by_id[item.chunk_id].text)
        if problems:  # the last gate: nothing with an unverifiable quote reaches the set
            rejections[problems[0]] += 1
            items.remove(item)
    report.questions_accepted = sum(1 for i in items if i.origin not in ("human", "feedback"))
    report.rejections = dict(rejections.most_common())
    if not items:
        raise RaftBuildError(
            f"no question survived the checks ({report.rejections or 'teacher produced none'}); "
            "try more chunks (--limit), a stronger teacher (--teacher URL) or --qa-file"
        )

    # The manifest keeps the assignment before the QA file's pins (a refresh re-reads that
    # file), so a refresh's --limit selection matches the first build's.
    examples = _examples(items, chunks, by_id, settings, {**splits, **qa_splits}, embedder,
                         store)
    validation = [ex for ex in examples if ex.split == "validation"]
    if settings.raft_cot_format == "own_words":
        examples = _own_words(examples, by_id, settings, given_engine, report, progress,
                              raft_dir / "cache" / "own-words.sqlite")
    if previous:
        current = set(by_id)
        report.dropped_deleted_oracle = sum(
            1 for cid in previous.get("oracle_chunks", []) if cid not in current
        )
    _write(raft_dir, name, examples, settings, report, store, limit, qa_path, validation,
           splits)
    (raft_dir / BUILDING).unlink(missing_ok=True)
    store.close()
    report.seconds = round(time.perf_counter() - started, 2)
    _rewrite_manifest_report(raft_dir / name, report)
    return report


def _previous_splits(raft_dir: Path, previous: dict[str, Any] | None) -> dict[str, str] | None:
    """The split of each document in the set a refresh starts from; sets written before the
    manifest kept them give theirs from their examples' metadata."""
    if not previous:
        return None
    if previous.get("splits"):
        return dict(previous["splits"])
    from raft import show  # show imports this module

    kept: dict[str, str] = {}
    for split in SPLITS:
        for record in show.load_examples(raft_dir / previous["name"], split):
            meta = record.get("meta", {})
            if meta.get("source"):
                kept[meta["source"]] = split
    return kept or None


def _plan(
    raft_dir: Path,
    settings: DocentSettings,
    limit: int | None,
    name: str | None,
    resume: bool,
    refresh: bool,
    qa_file: Path | None,
):  # type: ignore[no-untyped-def]
    """Resolve --resume / --refresh into the settings, limit, name and inputs to use."""
    if resume and refresh:
        raise ConfigError("use --resume or --refresh, not both")
    previous: dict[str, Any] | None = None
    if resume:
        state_path = raft_dir / BUILDING
        if not state_path.exists():
            raise RaftBuildError("nothing to resume: no interrupted `docent raft build` found")
        state = json.loads(state_path.read_text())
        settings = settings.with_overrides(**state["params"])
        return (
            settings,
            state["limit"],
            state["name"],
            Path(state["qa_file"]) if state["qa_file"] else None,
            None,
        )
    if refresh:
        latest = latest_manifest(raft_dir)
        if latest is None:
            raise RaftBuildError("nothing to refresh: build a RAFT set first (`docent raft build`)")
        settings = settings.with_overrides(**latest["params"])
        limit = latest["limit"]
        qa_file = Path(latest["qa_file"]) if latest.get("qa_file") else None
        previous = latest
    name = name or f"raft-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    if not _NAME.match(name):
        raise ConfigError(f"dataset name {name!r}: use letters, digits, '.', '_' or '-'")
    if (raft_dir / name).exists():
        raise ConfigError(f"a RAFT set named {name!r} exists already: choose another --name")
    if qa_file is not None and not qa_file.exists():
        raise ConfigError(f"--qa-file {qa_file} does not exist")
    return settings, limit, name, qa_file, previous


def _generate(
    engine: Engine | None,
    todo: list[StoredChunk],
    cache: GenerationCache,
    settings: DocentSettings,
    progress: Progress,
    verify: Callable[[str, StoredChunk], bool],
) -> None:
    """Teacher questions and answers for ``todo``, batch by batch, each batch cached."""
    step = settings.raft_batch_chunks
    progress("generate", 0, len(todo))
    for start in range(0, len(todo), step):
        batch = todo[start : start + step]
        results = [ChunkResult(c.chunk_id, c.text_hash) for c in batch]
        style = answer_style(settings)
        if style == "rules":
            _rule_questions(batch, results)
        elif engine is None:
            raise RaftBuildError(f"answer style {style!r} needs a teacher model")
        elif style == "teacher":
            _open_questions(engine, batch, results, settings)
        else:
            _span_questions(engine, batch, results, settings)
        for chunk, result in zip(batch, results, strict=True):
            for item in list(result.items):
                if not verify(item.question, chunk):
                    result.items.remove(item)
                    result.rejected.append(
                        {"question": item.question, "reason": "does_not_retrieve_its_chunk"}
                    )
        cache.add(results)
        progress("generate", min(start + step, len(todo)), len(todo))


def _item(
    chunk: StoredChunk, question: str, made: answers.Answer, origin: str = "teacher"
) -> QAItem:
    qid = "q-" + hashlib.sha256(f"{chunk.chunk_id}\x1f{question}".encode()).hexdigest()[:12]
    return QAItem(
        qid=qid,
        question=question,
        answer=made.answer,
        quote=made.quote,
        cot=made.cot,
        chunk_id=chunk.chunk_id,
        origin=origin,
    )


def _rule_questions(batch: list[StoredChunk], results: list[ChunkResult]) -> None:
    """Questions Docent writes itself from each chunk (raft/rule_questions.py), no model."""
    for chunk, result in zip(batch, results, strict=True):
        made = rule_questions.chunk_questions(chunk.text, str(chunk.metadata.get("title") or ""))
        result.generated = len(made)
        if not made:
            result.rejected.append({"question": "", "reason": "no_answer_span_in_chunk"})
        for q in made:
            reason = rule_questions.check(q) or questions.check_question(q.question, chunk.text)
            if reason:
                result.rejected.append({"question": q.question, "reason": reason})
                continue
            answer = answers.make_answer(q.question, q.answer, q.sentence, chunk.source)
            result.items.append(_item(chunk, q.question, answer, f"rules:{q.form}"))


def _cross_questions(
    targets: list[StoredChunk],
    results: list[ChunkResult | None],
    chunks: list[StoredChunk],
    verify: Callable[[str, StoredChunk], bool],
    report: BuildReport,
) -> list[QAItem]:
    """Fabbri et al.'s questions: a question written from one chunk's sentence, answered by
    another chunk that states the same answer in its own words (not cached: it depends on
    every chunk). Each must still lead retrieval to its new oracle."""
    by_id = {c.chunk_id: c for c in chunks}
    written = [
        (r.chunk_id, rule_questions.RuleQuestion(i.question, i.answer, i.quote, "cross", "wh"))
        for r in results if r is not None for i in r.items
    ]
    pool = [(c.chunk_id, s) for c in targets for s in rule_questions.split_sentences(c.text)]
    out: list[QAItem] = []
    for chunk_id, q in rule_questions.cross_sentence(written, pool):
        chunk = by_id[chunk_id]
        report.questions_generated += 1
        if not verify(q.question, chunk):
            report.rejections["cross_does_not_retrieve_its_chunk"] = (
                report.rejections.get("cross_does_not_retrieve_its_chunk", 0) + 1
            )
            continue
        answer = answers.make_answer(q.question, q.answer, q.sentence, chunk.source)
        out.append(_item(chunk, q.question, answer, "rules:cross"))
    return out


def _span_questions(
    engine: Engine, batch: list[StoredChunk], results: list[ChunkResult], settings: DocentSettings
) -> None:
    """Answer-first (small teachers): Docent picks answer spans, the teacher phrases questions."""
    asks: list[tuple[int, spans.Span]] = []
    for i, chunk in enumerate(batch):
        found = spans.candidate_spans(chunk.text, settings.raft_questions_per_chunk)
        if not found:
            results[i].rejected.append({"question": "", "reason": "no_answer_span_in_chunk"})
        asks.extend((i, span) for span in found)
    replies = engine.generate(
        [ChatRequest(spans.question_messages(sp), max_tokens=48) for _, sp in asks]
    )
    passed: list[tuple[int, spans.Span, str]] = []
    for (i, span), reply in zip(asks, replies, strict=True):
        results[i].generated += 1
        question = spans.clean_question(reply.text)
        reason = questions.check_question(question, batch[i].text) or spans.check_span_question(
            question, span
        )
        if reason:
            results[i].rejected.append({"question": question, "reason": reason})
        else:
            passed.append((i, span, question))
    checks = engine.generate(
        [ChatRequest(spans.answer_check_messages(q, sp), max_tokens=24) for _, sp, q in passed]
    )
    for (i, span, question), check in zip(passed, checks, strict=True):
        chunk = batch[i]
        if not spans.round_trip_agrees(check.text, span):
            results[i].rejected.append({"question": question, "reason": "round_trip_disagrees"})
            continue
        made = answers.make_answer(question, span.answer, span.sentence, chunk.source)
        results[i].items.append(_item(chunk, question, made))


def _open_questions(
    engine: Engine, batch: list[StoredChunk], results: list[ChunkResult], settings: DocentSettings
) -> None:
    """Strong teachers: open questions, then a chain of thought whose quotes are checked."""
    n = settings.raft_questions_per_chunk
    asks = [
        ChatRequest(
            questions.question_messages(c.text, c.metadata.get("title"), n), max_tokens=40 * n + 40
        )
        for c in batch
    ]
    pending: list[tuple[int, str]] = []
    for i, (chunk, reply) in enumerate(zip(batch, engine.generate(asks), strict=True)):
        proposed = questions.parse_questions(reply.text)
        results[i].generated = len(proposed)
        if not proposed:
            results[i].rejected.append(
                {"question": reply.text[:200], "reason": "no_question_parsed"}
            )
        for q in proposed[: 2 * n]:
            reason = questions.check_question(q, chunk.text)
            if reason:
                results[i].rejected.append({"question": q, "reason": reason})
            else:
                pending.append((i, q))
    replies = engine.generate(
        [ChatRequest(answers.cot_messages(q, batch[i].text), max_tokens=384) for i, q in pending]
    )
    for (i, q), reply in zip(pending, replies, strict=True):
        chunk = batch[i]
        made = answers.teacher_cot_answer(q, reply.text, chunk.text, chunk.source)
        if isinstance(made, str):
            results[i].rejected.append({"question": q, "reason": made})
            continue
        results[i].items.append(_item(chunk, q, made))


def _collect(
    results: Sequence[ChunkResult | None], report: BuildReport
) -> tuple[list[QAItem], Counter[str]]:
    items: list[QAItem] = []
    rejections: Counter[str] = Counter()
    for result in results:
        if result is None:
            continue
        report.questions_generated += result.generated
        rejections.update(result.rejections())
        items.extend(result.items)
    return items, rejections


def _human_items(
    qa_file: Path, chunks: list[StoredChunk]
) -> tuple[list[QAItem], dict[str, str], Counter[str]]:
    """Questions written by people (train split only), attached to the chunk holding their
    supporting sentence. Documents with test questions are pinned to the test split."""
    rows = []
    for number, line in enumerate(qa_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{qa_file}:{number} is not JSON: {exc}") from exc
    by_source: dict[str, list[StoredChunk]] = {}
    for c in chunks:
        by_source.setdefault(c.source, []).append(c)
    splits: dict[str, str] = {}
    items: list[QAItem] = []
    rejected: Counter[str] = Counter()
    for row in rows:
        source, split = row.get("source"), row.get("split", "train")
        if source and split == "test":
            # Documents behind held-out questions stay out of training; the rest keep the
            # seeded split, so validation is not left empty.
            splits[source] = "test"
        if split != "train" or not row.get("answerable", True):
            continue  # only train questions may be trained on
        oracle, sentence = locate_evidence(row, by_source.get(source or "", []))
        if oracle is None or sentence is None:
            rejected["human_evidence_not_indexed"] += 1
            continue
        answer = str(row["answer"])
        made = answers.make_answer(row["question"], answer, sentence, source or "")
        items.append(
            QAItem(
                qid=f"h-{row.get('id', len(items))}",
                question=row["question"],
                answer=answer,
                quote=sentence,
                cot=made.cot,
                chunk_id=oracle.chunk_id,
                origin="human",
            )
        )
    return items, splits, rejected


def locate_evidence(
    row: dict[str, Any], candidates: list[StoredChunk]
) -> tuple[StoredChunk | None, str | None]:
    evidence = squash(str(row.get("evidence") or "")).lower()
    answer = str(row.get("answer", ""))
    for chunk in candidates:
        flat = squash(chunk.text)
        if evidence and evidence in flat.lower():
            at = flat.lower().index(evidence)
            return chunk, flat[at : at + len(evidence)]
    for chunk in candidates:  # evidence split across chunks: the sentence holding the answer
        sentence = sentence_with(answer, chunk.text)
        if sentence:
            return chunk, sentence
    return None, None


def _dedupe(items: list[QAItem], embedder: Embedder, rejections: Counter[str]) -> list[QAItem]:
    if not items:
        return items
    vectors = embedder.encode([i.question for i in items])
    candidates = [questions.Candidate(i.chunk_id, i.question) for i in items]
    keep, dropped = questions.drop_duplicates(candidates, vectors)
    rejections.update(dropped)
    return [items[i] for i in keep]


def _examples(
    items: list[QAItem],
    chunks: list[StoredChunk],
    by_id: dict[str, StoredChunk],
    settings: DocentSettings,
    splits: dict[str, str],
    embedder: Embedder,
    store: AnyStore,
) -> list[Example]:
    from retrieval import Retriever

    retriever = Retriever(settings, embedder=embedder)
    try:

        def search(q: str, k: int) -> list[str]:
            return [h.chunk_id for h in retriever.search(q, k=k)]

        picker = DistractorPicker(chunks, search, settings.raft_hard_negatives)
        mix = MixSettings(
            settings.raft_distractors,
            settings.raft_p_oracle,
            settings.raft_refusal_fraction,
            settings.seed,
            settings.raft_refusal_related,
        )
        examples: list[Example] = []
        for item in items:
            oracle = by_id[item.chunk_id]
            if not (settings.raft_cot_format == "reasoning" and item.origin == "teacher"):
                # Targets are written at example time, so one cached question set serves
                # every format; under "reasoning" a teacher's own chain of thought is kept.
                item.cot = answers.make_answer(
                    item.question, item.answer, item.quote, oracle.source,
                    settings.raft_cot_format,
                ).cot
            examples.extend(make_examples(item, oracle, picker, mix, splits[oracle.source]))
        return examples
    finally:
        retriever.close()


def _own_words(
    examples: list[Example],
    by_id: dict[str, StoredChunk],
    settings: DocentSettings,
    engine: Engine | None,
    report: BuildReport,
    progress: Progress,
    cache_path: Path,
) -> list[Example]:
    """Targets that open with the served model's own answer (``raft.own_words``). The words
    must be the generator's, the model being tuned, never a remote teacher's. Its answers
    are kept in ``cache_path``, keyed by prompt, generator, engine kind and dtype."""
    from eval.answer_cache import AnswerCache
    from raft.own_words import rewrite_targets

    owned = engine is None or engine.kind == "openai"
    if owned:
        kind = resolve_engine_kind(settings)
        engine = build_engine(settings, kind="hf" if kind == "openai" else kind, lora=False)
    assert engine is not None
    dtype = auto_dtype() if settings.dtype == "auto" else settings.dtype
    cache = AnswerCache(cache_path, {"generator": settings.generator, "engine": engine.kind,
                                     "model": engine.model, "dtype": dtype})
    try:
        kept, dropped = rewrite_targets(examples, by_id, engine, progress, cache)
    finally:
        cache.close()
        if owned:
            engine.close()
    merged = Counter(report.rejections) + dropped
    report.rejections = dict(merged.most_common())
    if not any(ex.kind != "refusal" and ex.split == "train" for ex in kept):
        # Fail here, not at `docent train` with an empty training split.
        raise RaftBuildError(
            f"the model's own answers passed no check for the training split "
            f"({dict(dropped)}): use another --cot-format (quote) or more chunks"
        )
    return kept


def _write(
    raft_dir: Path,
    name: str,
    examples: list[Example],
    settings: DocentSettings,
    report: BuildReport,
    store: AnyStore,
    limit: int | None,
    qa_file: Path | None,
    validation: list[Example],
    splits: dict[str, str],
) -> None:
    from datasets import Dataset, DatasetDict

    staging = raft_dir / f".tmp-{name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    fmt = "chat" if settings.raft_format == "hf" else settings.raft_format
    digest = hashlib.sha256()
    per_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for ex in examples:
        per_split[ex.split].append(ex.record(fmt))
    for split, records in per_split.items():
        rng_for(settings.seed, "order", split).shuffle(records)
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (staging / f"{split}.jsonl").write_text(body, encoding="utf-8")
        digest.update(body.encode())
        report.examples[split] = len(records)
    asked = "".join(json.dumps({"meta": ex.record(fmt)["meta"]}, ensure_ascii=False) + "\n"
                    for ex in validation)
    (staging / VALIDATION_QUESTIONS).write_text(asked, encoding="utf-8")
    kinds = Counter(ex.kind for ex in examples)
    report.kinds = dict(kinds)
    DatasetDict({s: Dataset.from_list(r) for s, r in per_split.items() if r}).save_to_disk(
        str(staging / "hf")
    )
    used = {ex.oracle_id for ex in examples} | {c.chunk_id for ex in examples for c in ex.context}
    manifest = {
        "name": name,
        "created": _now(),
        "format": fmt,
        "index_version": store.version,
        "embedder": store.manifest.get("embedder"),
        "embed_precision": store.manifest.get("embed_precision", "fp32"),
        "chunk_size": store.manifest.get("chunk_size"),
        "chunks": {
            c.chunk_id: c.text_hash for c in store.iter_chunks() if c.chunk_id in used
        },
        "oracle_chunks": sorted({ex.oracle_id for ex in examples}),
        "teacher": report.teacher,
        "answer_style": answer_style(settings),
        "params": {f: getattr(settings, f) for f in RAFT_FIELDS},
        "limit": limit,
        "qa_file": str(qa_file) if qa_file else None,
        "dataset_hash": digest.hexdigest(),
        # Every indexed document's split, so a refresh keeps held-out documents held out.
        "splits": splits,
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    os.rename(staging, raft_dir / name)
    pointer = raft_dir / f"{LATEST}.tmp"
    pointer.write_text(name)
    os.replace(pointer, raft_dir / LATEST)


def _rewrite_manifest_report(folder: Path, report: BuildReport) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["report"] = report.as_dict()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)


def latest_manifest(raft_dir: Path) -> dict[str, Any] | None:
    pointer = raft_dir / LATEST
    if not pointer.exists():
        return None
    path = raft_dir / pointer.read_text().strip() / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
