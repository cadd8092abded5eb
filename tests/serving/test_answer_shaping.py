"""Citations and the answer-only stream, without a server."""

from __future__ import annotations

import pytest

from docent.errors import ConfigError
from docent.prompts import format_answer, quote
from retrieval import Hit
from serving.auth import KeyRing
from serving.openai_api import AnswerStreamer
from serving.rag import Answer, cite


def _hit(n: int, text: str, source: str = "a.md") -> Hit:
    return Hit(f"c{n}", n, 1.0 / n, text, source, None, "Sec", None, "default")


def _answer(raw: str) -> Answer:
    from docent.prompts import parse_answer

    parsed = parse_answer(raw)
    return Answer("q", parsed.answer, parsed.reasoning, False, [], [], [], "m", None, raw, "stop")


def test_quotes_are_tied_to_the_chunk_that_holds_them():
    hits = [_hit(1, "Refunds take 5 days."), _hit(2, "Links are valid for 72 hours,  then expire.")]
    citations, unsupported = cite(
        ["links are valid for 72 hours, then expire.", "Invented sentence.", "Refunds take 5 days"],
        hits,
    )
    assert [(c.document, c.chunk_id) for c in citations] == [(2, "c2"), (1, "c1")]
    assert unsupported == ["Invented sentence."]


@pytest.mark.parametrize("cut", [1, 3, 7, 1000])
def test_streamed_answer_joins_to_the_final_answer(cut):
    raw = format_answer(f"The guide says {quote('valid for 72 hours')}.", "72 hours") + "\nextra"
    for include_reasoning in (False, True):
        shaper = AnswerStreamer(raw=include_reasoning)
        pieces = [shaper.feed(raw[i : i + cut]) for i in range(0, len(raw), cut)]
        answer = _answer(raw.strip())
        pieces.append(shaper.finish(answer))
        expected = answer.raw if include_reasoning else "72 hours"
        assert "".join(pieces) == expected
        if not include_reasoning:
            assert "".join(pieces[:-1]) in ("72 hours", "72 hour", "72", "7", "")


def test_a_stream_without_the_answer_marker_sends_it_whole_at_the_end():
    shaper = AnswerStreamer()
    assert shaper.feed("Just some text") == ""
    assert shaper.finish(_answer("Just some text")) == "Just some text"


def test_a_held_stream_sends_only_the_final_answer_and_a_withheld_one_never():
    from docent.prompts import DECLINE_ANSWER
    from serving.openai_api import final_text

    raw = "Links last a week.\n<ANSWER>: 7 days"
    held = AnswerStreamer(hold=True)
    assert [held.feed(raw[i : i + 4]) for i in range(0, len(raw), 4)] == [""] * 9
    withheld = _answer(raw)
    withheld.answer, withheld.declined, withheld.ungrounded = DECLINE_ANSWER, True, True
    assert held.finish(withheld) == DECLINE_ANSWER
    # The whole output, when asked for, still ends with Docent's decline, not the model's.
    shaper = AnswerStreamer(raw=True, hold=True)
    pieces = [shaper.feed(raw[i : i + 4]) for i in range(0, len(raw), 4)]
    pieces.append(shaper.finish(withheld))
    assert "".join(pieces) == final_text(withheld, raw=True)
    assert final_text(withheld, raw=True).endswith(f"<ANSWER>: {DECLINE_ANSWER}")


def test_api_keys_parse_and_match_in_constant_time():
    ring = KeyRing(" alice-key-1234 , root-key-5678:admin ,")
    assert ring.enabled
    assert ring.find("alice-key-1234").admin is False
    assert ring.find("root-key-5678").admin is True
    assert ring.find("alice-key-123") is None
    assert not KeyRing(None).enabled
    with pytest.raises(ConfigError, match="KEY:admin"):
        KeyRing("abcdefgh:root")
    with pytest.raises(ConfigError, match="8 characters"):
        KeyRing("short")
