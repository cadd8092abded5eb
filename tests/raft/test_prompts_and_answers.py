"""The shared prompt template, answer parsing and the quote checks every answer passes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from docent import prompts
from raft import answers

ORACLE = (
    "## Refunds\n\nAnnual plans can be refunded within 21 days of purchase.  Monthly plans\n"
    "are not refunded, but you can cancel at any time."
)


@dataclass
class Doc:
    text: str
    source: str


def test_messages_hold_every_document_and_the_question():
    docs = [Doc("Alpha text.", "a.md"), Doc("Beta text.", "b.pdf")]
    messages = prompts.build_messages("What is alpha?", docs)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert prompts.BEGIN_QUOTE in messages[0]["content"]
    assert prompts.ANSWER_PREFIX in messages[0]["content"]
    user = messages[1]["content"]
    assert '<DOCUMENT id="1" source="a.md">' in user and '<DOCUMENT id="2" source="b.pdf">' in user
    assert user.rstrip().endswith("Question: What is alpha?")
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert prompts.build_messages("q", docs, history)[1:3] == history


def test_parse_answer_splits_reasoning_quotes_and_answer():
    text = prompts.format_answer(
        f"It says {prompts.quote('Annual plans can be refunded within 21 days of purchase.')}",
        "21 days",
    )
    parsed = prompts.parse_answer(text)
    assert parsed.answer == "21 days" and not parsed.declined
    assert parsed.quotes == ["Annual plans can be refunded within 21 days of purchase."]
    assert prompts.parse_answer("just words").answer == "just words"
    assert prompts.parse_answer(prompts.decline_answer()).declined


def test_a_correct_answer_passes_the_quote_check_whitespace_normalised():
    made = answers.make_answer(
        "How long is the refund window for annual plans?",
        "21 days",
        "Annual plans can be refunded within 21 days of purchase.",
        "billing.md",
    )
    assert answers.check_cot(made.cot, ORACLE) == []
    assert made.cot.endswith(f"{prompts.ANSWER_PREFIX} 21 days")


@pytest.mark.parametrize(
    "cot,problem",
    [
        (
            prompts.format_answer(prompts.quote("Refunds are granted within 30 days."), "30 days"),
            "quote_not_in_oracle",
        ),
        (prompts.format_answer("No quote at all.", "21 days"), "no_quote"),
        (prompts.quote("Annual plans can be refunded within 21 days of purchase."), "empty_answer"),
        (
            prompts.format_answer(prompts.quote("Monthly plans are not refunded"), ""),
            "empty_answer",
        ),
    ],
)
def test_planted_wrong_quote_or_missing_answer_is_rejected(cot, problem):
    assert problem in answers.check_cot(cot, ORACLE)


@pytest.mark.parametrize(
    "reply,expected",
    [
        ("21 days", "21 days"),
        ("Short answer: within 21 days", "within 21 days"),
        ("NONE", "teacher_found_no_answer"),
        ("30 days", "answer_not_in_oracle"),
        ("annual plans", "answer_repeats_question"),
        (" ".join(["word"] * 30), "answer_too_long"),
    ],
)
def test_extractive_answers_must_be_found_in_the_oracle(reply, expected):
    made = answers.extractive_answer(
        "How long do annual plans have for a refund?", reply, ORACLE, "billing.md"
    )
    got = made.answer if isinstance(made, answers.Answer) else made
    assert got == expected
    if isinstance(made, answers.Answer):
        assert answers.check_cot(made.cot, ORACLE) == []


def test_teacher_chain_of_thought_is_kept_repaired_or_rejected():
    q = "How long do annual plans have for a refund?"
    good = prompts.format_answer(
        "The billing page says "
        + prompts.quote("Annual plans can be refunded within 21 days of purchase."),
        "21 days",
    )
    kept = answers.teacher_cot_answer(q, good, ORACLE, "billing.md")
    assert isinstance(kept, answers.Answer) and kept.cot == good
    invented = prompts.format_answer(prompts.quote("Refunds take 21 days."), "21 days")
    repaired = answers.teacher_cot_answer(q, invented, ORACLE, "billing.md")
    assert isinstance(repaired, answers.Answer) and answers.check_cot(repaired.cot, ORACLE) == []
    wrong = prompts.format_answer(prompts.quote("Refunds take 30 days."), "30 days")
    assert answers.teacher_cot_answer(q, wrong, ORACLE, "billing.md") == "quote_not_in_oracle"
