"""Oracle/distractor mix, refusal examples and splits, on synthetic chunks (no model)."""

from __future__ import annotations

from collections import Counter

import pytest

from docent.prompts import decline_answer
from ingest.docstore import StoredChunk
from raft.dataset import DistractorPicker, MixSettings, QAItem, assign_splits, make_examples


def _chunks(n_docs: int = 12, per_doc: int = 4) -> list[StoredChunk]:
    out = []
    for d in range(n_docs):
        for i in range(per_doc):
            cid = f"d{d}-{i}"
            out.append(
                StoredChunk(
                    len(out),
                    cid,
                    f"/docs/doc{d}.md",
                    i,
                    f"Document {d} part {i} says fact {d * 10 + i}.",
                    cid,
                    {"source": f"doc{d}.md"},
                )
            )
    return out


def _item(n: int, oracle: StoredChunk) -> QAItem:
    return QAItem(
        qid=f"q{n}",
        question=f"What does part {oracle.idx} of doc say?",
        answer=f"fact {n}",
        quote=oracle.text,
        cot="cot",
        chunk_id=oracle.chunk_id,
    )


def _hard_search(chunks):
    # Pretend retrieval: the same part number in other documents looks relevant.
    def search(question: str, k: int) -> list[str]:
        part = question.split("part ")[1].split()[0]
        return [c.chunk_id for c in chunks if c.chunk_id.endswith(f"-{part}")][:k]

    return search


@pytest.mark.parametrize("p_oracle", [0.8, 0.5, 1.0, 0.0])
def test_oracle_fraction_is_p_and_context_size_is_k_plus_one(p_oracle):
    chunks = _chunks()
    picker = DistractorPicker(chunks, _hard_search(chunks), hard_fraction=0.5)
    mix = MixSettings(distractors=4, p_oracle=p_oracle, refusal_fraction=0.0, seed=3)
    examples = [
        ex
        for n in range(600)
        for ex in make_examples(
            _item(n, chunks[n % len(chunks)]), chunks[n % len(chunks)], picker, mix, "train"
        )
    ]
    share = sum(ex.has_oracle for ex in examples) / len(examples)
    assert abs(share - p_oracle) < 0.05
    for ex in examples:
        ids = [c.chunk_id for c in ex.context]
        assert len(ids) == 5 and len(set(ids)) == 5
        assert (ex.oracle_id in ids) == ex.has_oracle
        oracle_doc = next(c.doc_id for c in chunks if c.chunk_id == ex.oracle_id)
        others = [c for c in ex.context if c.chunk_id != ex.oracle_id]
        assert all(c.doc_id != oracle_doc for c in others)
        assert ex.completion == "cot"  # oracle-free examples keep the oracle's answer


def test_distractors_mix_hard_negatives_and_random_chunks():
    chunks = _chunks()
    picker = DistractorPicker(chunks, _hard_search(chunks), hard_fraction=0.5)
    import random

    picked = picker.pick("What does part 2 of doc say?", chunks[2], 4, random.Random(0))
    hard = [c for c in picked if c.chunk_id.endswith("-2")]
    assert len(hard) >= 2 and len(picked) == 4
    none_hard = DistractorPicker(chunks, _hard_search(chunks), hard_fraction=0.0)
    assert len(none_hard.pick("What does part 2 of doc say?", chunks[2], 4, random.Random(0))) == 4


def test_refusal_examples_decline_over_unrelated_chunks():
    chunks = _chunks()
    picker = DistractorPicker(chunks, _hard_search(chunks), hard_fraction=0.5)
    mix = MixSettings(distractors=4, p_oracle=0.8, refusal_fraction=0.05, seed=1)
    examples = [
        ex
        for n in range(1000)
        for ex in make_examples(_item(n, chunks[n % 48]), chunks[n % 48], picker, mix, "train")
    ]
    kinds = Counter(ex.kind for ex in examples)
    assert 0.03 < kinds["refusal"] / 1000 < 0.07
    for ex in (e for e in examples if e.kind == "refusal"):
        assert ex.completion == decline_answer() and not ex.has_oracle
        assert all(ex.answer.lower() not in c.text.lower() for c in ex.context)
        assert ex.oracle_id not in [c.chunk_id for c in ex.context]


def test_same_seed_same_examples_other_seed_other_examples():
    chunks = _chunks()
    picker = DistractorPicker(chunks, _hard_search(chunks), hard_fraction=0.5)

    def run(seed):
        mix = MixSettings(seed=seed)
        return [
            [c.chunk_id for c in ex.context]
            for n in range(40)
            for ex in make_examples(_item(n, chunks[n]), chunks[n], picker, mix, "train")
        ]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_splits_are_by_source_deterministic_and_cover_all_three():
    sources = [f"doc{i}.md" for i in range(30)]
    splits = assign_splits(sources * 3, seed=0, fractions=(0.8, 0.1, 0.1))
    assert set(splits) == set(sources)
    counts = Counter(splits.values())
    assert counts == {"train": 24, "validation": 3, "test": 3}
    assert splits == assign_splits(list(reversed(sources)), 0, (0.8, 0.1, 0.1))
    assert splits != assign_splits(sources, 1, (0.8, 0.1, 0.1))
    tiny = assign_splits(["a.md", "b.md", "c.md"], 0, (0.8, 0.1, 0.1))
    assert sorted(tiny.values()) == ["test", "train", "validation"]


def test_a_refresh_keeps_each_documents_split_and_hashes_new_ones_alone():
    fractions = (0.8, 0.1, 0.1)
    first = assign_splits([f"doc{i}.md" for i in range(27)], 0, fractions)
    new = [f"new{i}.md" for i in range(3)]
    again = assign_splits([*first, *new], 0, fractions, keep=first)
    assert {s: again[s] for s in first} == first  # no held-out document moves into training
    # A new document's split depends on its name only, not on what else was added.
    alone = assign_splits([*first, "new0.md"], 0, fractions, keep=first)
    assert again["new0.md"] == alone["new0.md"]
    many = assign_splits([f"n{i}.md" for i in range(2000)], 0, fractions, keep={"x": "train"})
    shares = Counter(many.values())
    assert 150 < shares["test"] < 250 and 150 < shares["validation"] < 250
    # Without a previous assignment the sources are re-shuffled and some change split.
    reshuffled = assign_splits([*first, *new], 0, fractions)
    assert sum(reshuffled[s] != first[s] for s in first) > 0
    broken = assign_splits(["a.md"], 0, fractions, keep={"a.md": "holdout"})
    assert broken["a.md"] in {"train", "validation", "test"}


def test_records_in_chat_and_completion_form():
    chunks = _chunks()
    picker = DistractorPicker(chunks, None, hard_fraction=0.5)
    ex = make_examples(_item(0, chunks[0]), chunks[0], picker, MixSettings(seed=0), "test")[0]
    chat = ex.record("chat")
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant"]
    assert chat["meta"]["split"] == "test" and chat["meta"]["oracle_chunk"] == "d0-0"
    comp = ex.record("completion")
    assert [m["role"] for m in comp["prompt"]] == ["system", "user"]
    assert comp["completion"] == [{"role": "assistant", "content": "cot"}]
