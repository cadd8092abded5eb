"""Question parsing, filters, answer spans and duplicate removal."""

from __future__ import annotations

import pytest

from raft import questions, spans

CHUNK = (
    "## Refunds\n\nAnnual plans can be refunded within 21 days of purchase. Error QF-4127 means "
    "the sync token expired. The Lantern release shipped on 3 March 2025. Support is led by "
    "our manager Ines Calloway in Tallinn. Write to billing@quillfeather.app for invoices."
)


def test_parse_questions_strips_numbering_and_keeps_question_lines():
    reply = '1. What is the refund window?\n2) "Who leads support?"\nSure! Here you go.\n- Why?'
    assert questions.parse_questions(reply) == [
        "What is the refund window?",
        "Who leads support?",
        "Why?",
    ]


@pytest.mark.parametrize(
    "question,reason",
    [
        ("How long is the refund window for annual plans?", None),
        ("Why?", "bad_format"),
        ("What does the passage say about annual plans refunds?", "names_the_passage"),
        ("According to the text, when are annual plans refunded?", "names_the_passage"),
        ("What is the capital of France and Spain?", "not_about_chunk"),
        ("How long is the refund window for annual plans", "bad_format"),
    ],
)
def test_question_filters(question, reason):
    assert questions.check_question(question, CHUNK) == reason


def test_candidate_spans_pick_specific_facts_from_different_sentences():
    found = spans.candidate_spans(CHUNK, 5)
    kinds = {s.kind: s.answer for s in found}
    assert kinds["date"] == "3 March 2025"
    assert kinds["code"] == "QF-4127"
    assert kinds["email"] == "billing@quillfeather.app"
    assert "amount" in kinds and kinds["amount"].startswith("21 days")
    assert len({s.sentence for s in found}) == len(found)
    for span in found:
        assert span.answer in span.sentence and span.sentence in " ".join(CHUNK.split())


@pytest.mark.parametrize(
    "question,kind,answer,reason",
    [
        ("When did the Lantern release ship?", "date", "3 March 2025", None),
        ("What shipped on 3 March 2025?", "date", "3 March 2025", "answer_in_question"),
        ("Who shipped the Lantern release?", "date", "3 March 2025", "does_not_ask_for_date"),
        ("Which error code means the sync token expired?", "code", "QF-4127", None),
    ],
)
def test_span_questions_must_ask_for_their_answer(question, kind, answer, reason):
    sentence = next(s.sentence for s in spans.candidate_spans(CHUNK, 5) if s.kind == kind)
    assert spans.check_span_question(question, spans.Span(sentence, answer, kind)) == reason


def test_round_trip_needs_a_short_reply_naming_the_answer():
    span = spans.Span("The Lantern release shipped on 3 March 2025.", "3 March 2025", "date")
    assert spans.round_trip_agrees("On 3 March 2025.", span)
    assert not spans.round_trip_agrees("In April.", span)
    assert not spans.round_trip_agrees(span.sentence + " " + "and more words " * 5, span)


def test_exact_and_near_duplicates_are_dropped(embedder):
    texts = [
        "How long is the refund window for annual plans?",
        "How long is the refund window for annual plans?",
        "How long is the refund window for the annual plans?",
        "Which error code means the sync token expired?",
    ]
    cands = [questions.Candidate("c1", t) for t in texts]
    keep, dropped = questions.drop_duplicates(cands, embedder.encode(texts))
    assert keep == [0, 3]
    assert dropped == {"duplicate": 1, "near_duplicate": 1}
    keep_plain, _ = questions.drop_duplicates(cands, None)
    assert keep_plain == [0, 2, 3]
