"""Targets in the model's own words (``raft.own_words``): the checks an answer sentence must
pass before it opens a training target, and the target's form."""

from __future__ import annotations

import pytest

from docent.prompts import parse_answer
from raft.own_words import check_restatement, own_words_target
from serving.attribution import final_answer

EVIDENCE = "Each API key may send up to 120 requests per minute on the Pro plan."
QUESTION = "What is the API rate limit per key on the Pro plan?"


def test_a_restatement_that_states_the_answer_is_kept():
    got = check_restatement(
        "The rate limit per key on the Pro plan is 120 requests per minute. It resets.",
        QUESTION, "120 requests per minute", EVIDENCE,
    )
    assert got.sentence == "The rate limit per key on the Pro plan is 120 requests per minute."
    assert not got.reason


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ("", "empty"),
        ("The limit is 60 requests per minute.", "misses_answer"),
        ("The answer is: 120 requests per minute.", "no_restatement"),
        ("Question: What is the limit? 120 requests per minute.", "no_restatement"),
        ("The limit is 120 requests per minute, or 240 on Business.", "new_number"),
        ('<DOCUMENT id="1"> 120 requests per minute', "markup"),
        ("## The Pro plan allows 120 requests per minute.", "markup"),
        ("Quillfeather engineers in Berlin tuned 120 requests per minute for fairness reasons.",
         "unsupported_words"),
        ("The Pro plan " + "really " * 40 + "allows 120 requests per minute.", "too_long"),
    ],
)
def test_answers_that_invent_or_miss_are_refused_with_a_reason(output, reason):
    got = check_restatement(output, QUESTION, "120 requests per minute", EVIDENCE)
    assert got.reason == reason and not got.sentence


def test_only_the_sentence_before_a_quote_or_answer_line_counts():
    output = ("The limit is 120 requests per minute. ##begin_quote##whatever##end_quote##\n"
              "<ANSWER>: 120")
    got = check_restatement(output, QUESTION, "120 requests per minute", EVIDENCE)
    assert got.sentence == "The limit is 120 requests per minute."


def test_the_target_opens_with_the_sentence_then_quotes_then_answers():
    target = own_words_target("The limit is 120 requests per minute.", EVIDENCE,
                              "120 requests per minute")
    parsed = parse_answer(target)
    assert target.startswith("The limit is 120 requests per minute. ##begin_quote##")
    assert parsed.quotes == [EVIDENCE] and parsed.answer == "120 requests per minute"
    # What eval scores and serving attributes is the <ANSWER>: line, not the sentence.
    assert final_answer(target) == "120 requests per minute"
