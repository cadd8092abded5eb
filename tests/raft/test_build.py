"""``docent raft build`` end to end with the real embedded teacher (SmolLM2 via transformers)
on the handbook, plus resume, refresh, and broken teachers."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence

import pytest

from docent.engine import ChatRequest, Completion, Engine, EngineUnavailableError
from docent.errors import EmptyIndexError
from docent.prompts import ANSWER_PREFIX, normalise, parse_answer, squash
from docent.settings import DocentSettings
from eval.validation import validation_questions
from ingest.pipeline import refresh_index
from ingest.store import KnowledgeStore
from raft.build import BUILDING, RaftBuildError, build_raft_set
from raft.dataset import VALIDATION_QUESTIONS
from raft.show import load_examples, load_manifest
from serving.attribution import contains_phrase

from conftest import HANDBOOK, NO_MODEL_RECIPE, write_corpus, write_qa

QA = HANDBOOK / "qa.jsonl"


class CountingEngine(Engine):
    """Wraps a real engine and counts requests, to see what a build generated."""

    kind = "counting"

    def __init__(self, inner: Engine) -> None:
        self.inner, self.model, self.requests = inner, inner.model, 0

    def generate(self, requests: Sequence[ChatRequest], progress=None) -> list[Completion]:
        self.requests += len(requests)
        return self.inner.generate(requests, progress)


class GarbageEngine(Engine):
    """A teacher that keeps returning malformed output."""

    kind, model = "garbage", "garbage"

    def generate(self, requests: Sequence[ChatRequest], progress=None) -> list[Completion]:
        return [Completion("}}}{{ <<>>", 1, 1, "stop", "garbage") for _ in requests]


@pytest.fixture(scope="session")
def teacher():
    from docent.engine.hf import HFEngine
    from docent.models import generator_path

    return HFEngine(generator_path(), batch_size=16)


@pytest.fixture
def workspace(tmp_path, handbook_settings) -> DocentSettings:
    """A private copy of the ingested handbook, so builds don't see each other."""
    shutil.copytree(handbook_settings.workspace / "index", tmp_path / "ws" / "index")
    # The paper's recipe (P 0.8, 4 distractors, chain of thought), not Docent's default, so
    # those levers stay tested: docent tune and bench/raft_gain.py ablate them.
    return DocentSettings(
        workspace=tmp_path / "ws", raft_batch_chunks=8, raft_answer_style="extractive",
        raft_p_oracle=0.8, raft_distractors=4, top_k=5, **NO_MODEL_RECIPE,
    )


def _all_records(folder):
    return [r for split in ("train", "validation", "test") for r in load_examples(folder, split)]


def test_build_writes_verified_raft_examples(workspace, teacher, embedder):
    report = build_raft_set(workspace, limit=24, qa_file=QA, engine=teacher, embedder=embedder)
    folder = workspace.workspace / "raft" / report.name
    manifest = load_manifest(folder)
    assert manifest["teacher"] == "local:default" and manifest["answer_style"] == "extractive"
    assert manifest["params"]["raft_p_oracle"] == 0.8 and manifest["limit"] == 24
    assert manifest["index_version"] == "v000001" and len(manifest["dataset_hash"]) == 64
    assert report.chunks_generated == 24 and report.questions_generated > 0
    assert report.human_questions >= 80  # the handbook's train questions
    assert sum(report.rejections.values()) > 0  # the small teacher's weak output is filtered

    store = KnowledgeStore.open(workspace.workspace / "index")
    chunks = {c.chunk_id: c for c in store.docstore.iter_chunks()}
    store.close()
    records = _all_records(folder)
    assert len(records) == sum(report.examples.values()) > 80
    for rec in records:
        meta, msgs = rec["meta"], rec["messages"]
        assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
        assert msgs[1]["content"].count("<DOCUMENT ") == 5 == len(meta["context_chunks"])
        assert (meta["oracle_chunk"] in meta["context_chunks"]) == meta["has_oracle"]
        parsed = parse_answer(msgs[2]["content"])
        assert ANSWER_PREFIX in msgs[2]["content"] and parsed.answer
        if meta["kind"] != "refusal":
            oracle = squash(chunks[meta["oracle_chunk"]].text).lower()
            assert parsed.quotes and all(squash(q).lower() in oracle for q in parsed.quotes)
    # No source document in two splits; the handbook's test documents stay out of train.
    split_of: dict[str, set[str]] = {}
    for rec in records:
        split_of.setdefault(rec["meta"]["source"], set()).add(rec["meta"]["split"])
    assert all(len(s) == 1 for s in split_of.values())
    qa = [json.loads(line) for line in QA.read_text().splitlines()]
    test_sources = {r["source"] for r in qa if r["split"] == "test" and r["source"]}
    assert not any(split_of.get(src) == {"train"} for src in test_sources)
    kinds = report.kinds
    assert 0.65 <= kinds["oracle"] / (kinds["oracle"] + kinds["no_oracle"]) <= 0.95

    from datasets import load_from_disk

    hf = load_from_disk(str(folder / "hf"))
    assert hf["train"].num_rows == report.examples["train"]


def test_interrupted_build_resumes_without_redoing_finished_chunks(workspace, teacher, embedder):
    class Interrupt(Exception):
        pass

    def stop_after_first_batch(stage: str, done: int, total: int) -> None:
        if stage == "generate" and done >= 8:
            raise Interrupt

    with pytest.raises(Interrupt):
        build_raft_set(
            workspace,
            limit=16,
            qa_file=QA,
            engine=teacher,
            embedder=embedder,
            progress=stop_after_first_batch,
        )
    state = json.loads((workspace.workspace / "raft" / BUILDING).read_text())
    counting = CountingEngine(teacher)
    report = build_raft_set(workspace, resume=True, engine=counting, embedder=embedder)
    assert report.name == state["name"]
    assert (report.chunks_reused, report.chunks_generated) == (8, 8)
    assert counting.requests > 0
    assert not (workspace.workspace / "raft" / BUILDING).exists()
    again = CountingEngine(teacher)
    refreshed = build_raft_set(workspace, refresh=True, engine=again, embedder=embedder)
    assert refreshed.chunks_generated == 0 and again.requests == 0  # nothing changed


def test_refresh_after_an_edit_regenerates_only_changed_chunks(tmp_path, teacher, embedder):
    docs = {
        f"doc{i}.md": f"# Service {i}\n\nThe Service {i} desk opens at 0{i}:30 on weekdays. "
        f"Tickets for Service {i} are answered within {i + 2} working days. The Service {i} "
        f"lead is reached at lead{i}@example.org for escalations."
        for i in range(1, 7)
    }
    corpus = write_corpus(tmp_path / "docs", docs)
    qa = write_qa(
        tmp_path / "qa.jsonl",
        [
            (
                f"How fast are Service {i} tickets answered?",
                f"{i + 2} working days",
                f"doc{i}.md",
                f"Tickets for Service {i} are answered within {i + 2} working days.",
            )
            for i in range(1, 7)
        ],
    )
    settings = DocentSettings(workspace=tmp_path / "ws", raft_answer_style="extractive",
                              **NO_MODEL_RECIPE)
    refresh_index([corpus], settings, embedder=embedder)
    first = build_raft_set(settings, qa_file=qa, engine=teacher, embedder=embedder)
    assert first.chunks_generated == 6 and first.human_questions == 6

    (corpus / "doc2.md").write_text(docs["doc2.md"].replace("4 working days", "9 working days"))
    (corpus / "doc5.md").unlink()
    for i in (7, 8):  # new documents must not re-shuffle the old ones between the splits
        (corpus / f"doc{i}.md").write_text(docs["doc1.md"].replace("Service 1", f"Service {i}"))
    refresh_index([corpus], settings, embedder=embedder)
    counting = CountingEngine(teacher)
    second = build_raft_set(settings, refresh=True, engine=counting, embedder=embedder)
    assert (second.chunks_generated, second.chunks_reused) == (3, 4)
    assert second.dropped_deleted_oracle >= 1
    before, after = (
        json.loads((settings.workspace / "raft" / r.name / "manifest.json").read_text())["splits"]
        for r in (first, second)
    )
    assert set(before.values()) == {"train", "validation", "test"}
    assert {s: after[s] for s in before if "doc5" not in s} == {
        s: v for s, v in before.items() if "doc5" not in s}
    assert {s for s in after if "doc7" in s or "doc8" in s} and len(after) == len(before) + 1
    records = _all_records(settings.workspace / "raft" / second.name)
    assert all(r["meta"]["source"] != "doc5.md" for r in records)
    store = KnowledgeStore.open(settings.workspace / "index")
    live = {c.chunk_id for c in store.docstore.iter_chunks()}
    store.close()
    assert all(set(r["meta"]["context_chunks"]) <= live for r in records)  # resampled


class NoModel(Engine):
    """Fails the test if anything asks a model: rule questions must need none."""

    kind, model = "none", "none"

    def generate(self, requests: Sequence[ChatRequest], progress=None) -> list[Completion]:
        raise AssertionError(f"a rules build asked a model {len(requests)} questions")


def test_documents_alone_give_verified_questions_with_no_model(tmp_path, handbook_settings,
                                                              embedder):
    shutil.copytree(handbook_settings.workspace / "index", tmp_path / "ws" / "index")
    settings = DocentSettings(workspace=tmp_path / "ws", raft_cot_format="quote",
                              raft_p_oracle=1.0)
    report = build_raft_set(settings, limit=30, engine=NoModel(), embedder=embedder)
    assert report.human_questions == 0 and report.teacher == "local:default"
    # Rule questions from 30 chunks: most chunks give more than one that survives every
    # check. Rules v7 measured 49 here in the whole suite (v6: 58, v5: 60+; what v6 and v7
    # dropped was malformed, see test_rule_questions.py), 2.1 per chunk on the whole handbook.
    assert report.questions_accepted >= 45, report.as_dict()
    assert report.rejections.get("does_not_retrieve_its_chunk", 0) > 0  # the check runs
    assert report.kinds.get("no_oracle", 0) == 0  # P = 1.0
    folder = settings.workspace / "raft" / report.name
    assert load_manifest(folder)["answer_style"] == "rules"
    for record in _all_records(folder):
        meta, answer = record["meta"], record["messages"][-1]["content"]
        if meta["kind"] == "refusal":
            continue
        parsed = parse_answer(answer)
        assert meta["origin"].startswith("rules:")
        assert answer.startswith("##begin_quote##")  # the "quote" format: evidence first
        assert parsed.answer == meta["answer"] and parsed.quotes == [meta["quote"]]
        assert squash(meta["quote"]) in squash(record["messages"][1]["content"])  # the oracle
        # On word bounds, as the build checks it ("Pro" may stand in "Provide").
        assert f" {normalise(meta['answer'])} " not in f" {normalise(meta['question'])} "
        assert normalise(meta["answer"]) not in ("", "the", "a", "an"), meta


def test_own_words_targets_open_with_the_models_sentence(tmp_path, handbook_settings, embedder,
                                                        teacher):
    shutil.copytree(handbook_settings.workspace / "index", tmp_path / "ws" / "index")
    settings = DocentSettings(workspace=tmp_path / "ws", raft_cot_format="own_words",
                              raft_p_oracle=1.0, raft_refusal_fraction=0.0, top_k=3,
                              raft_distractors=2)
    counting = CountingEngine(teacher)
    report = build_raft_set(settings, limit=6, engine=counting, embedder=embedder)
    assert counting.requests > 0  # the served model wrote the openings, not a rule
    kept = sum(report.examples.values())
    dropped = {k: v for k, v in report.rejections.items() if k.startswith("own_words_")}
    assert kept > 0, report.rejections
    assert kept + sum(dropped.values()) == report.questions_accepted
    for record in _all_records(settings.workspace / "raft" / report.name):
        meta, answer = record["meta"], record["messages"][-1]["content"]
        parsed = parse_answer(answer)
        opening = answer.split("##begin_quote##")[0].strip()
        assert meta["own_words"] and opening, answer
        assert contains_phrase(opening, meta["answer"])  # the sentence states the answer
        assert parsed.answer == meta["answer"] and parsed.quotes == [meta["quote"]]
    # Adapters are validated on every validation question the build accepted, not only on
    # those whose own-words target survived (the ones the base model already answers).
    folder = settings.workspace / "raft" / report.name
    asked = {r["question"] for r in validation_questions(folder, cap=1000, seed=0)}
    kept = {" ".join(r["meta"]["question"].split()) for r in load_examples(folder, "validation")}
    assert (folder / VALIDATION_QUESTIONS).exists() and asked >= kept
    # Another set from the same questions (another recipe, a rebuild) reuses the answers.
    asked = counting.requests
    again = build_raft_set(settings, limit=6, name="again", engine=counting, embedder=embedder)
    assert counting.requests == asked and again.examples == report.examples


def test_empty_workspace_is_a_clear_error(tmp_path, embedder):
    with pytest.raises(EmptyIndexError, match="docent ingest"):
        build_raft_set(
            DocentSettings(workspace=tmp_path / "none"), engine=GarbageEngine(), embedder=embedder
        )


def test_malformed_teacher_output_is_counted_not_fatal(workspace, embedder):
    report = build_raft_set(
        workspace, limit=8, qa_file=QA, engine=GarbageEngine(), embedder=embedder
    )
    assert report.questions_accepted == 0 and report.human_questions > 0
    assert (
        report.rejections.get("bad_format", 0) + report.rejections.get("no_answer_span_in_chunk", 0)
        > 0
    )
    with pytest.raises(RaftBuildError, match="no question survived"):
        build_raft_set(workspace, limit=8, engine=GarbageEngine(), embedder=embedder)


def test_unreachable_teacher_url_is_a_clear_error_and_keeps_finished_work(workspace, embedder):
    remote = workspace.with_overrides(
        engine="openai", llm_url="http://127.0.0.1:9/v1", llm_model="teacher",
        raft_answer_style="auto",  # a URL teacher writes open questions: it is asked at once
    )
    with pytest.raises(EngineUnavailableError, match="unreachable"):
        build_raft_set(remote, limit=4, embedder=embedder)
    assert (workspace.workspace / "raft" / BUILDING).exists()  # --resume can pick it up


def test_own_words_that_keep_no_training_target_fail_the_build(workspace, embedder):
    """The default targets are the model's own answers; where none passes its checks the
    build says so and what to do, instead of writing a set `docent train` cannot use."""
    settings = workspace.with_overrides(raft_cot_format="own_words")
    with pytest.raises(RaftBuildError, match="passed no check for the training split.*quote"):
        build_raft_set(settings, limit=0, qa_file=QA, name="mute", engine=GarbageEngine(),
                       embedder=embedder)
    assert not (workspace.workspace / "raft" / "mute").exists()
