"""The quote guard, step by step with the real SmolLM2 tokenizer: whatever the logits favour,
the text between the quote markers stays a span of the sources, the closing marker is
written whole, and outside quotes the logits are left alone. Through real engines (an
overfit model that quotes, transformers and vLLM): tests/raft/test_parity.py."""

from __future__ import annotations

import pytest
import torch

from docent.engine.quote_guard import QuoteGuard, TokenTexts, open_quote
from docent.models import generator_path
from docent.prompts import BEGIN_QUOTE, END_QUOTE, parse_answer
from eval.metrics import quote_found

SOURCES = [
    "Pricing. The API rate limit per key on the Pro plan is 120 requests per minute.",
    "Invitations. Invitation links expire after 72 hours. Admins can resend them.",
]


@pytest.fixture(scope="module")
def vocab() -> TokenTexts:
    from transformers import AutoTokenizer

    return TokenTexts(AutoTokenizer.from_pretrained(generator_path()))


def _greedy(vocab: TokenTexts, guard: QuoteGuard, start: str, favour: str, steps: int,
            seed: int = 0) -> str:
    """Greedy decoding over noise; step i favours the i-th token of ``favour`` (a model that
    means to write ``favour``, e.g. a paraphrase inside its quote)."""
    tok = vocab.tokenizer
    ids = tok.encode(start, add_special_tokens=False)
    gen = torch.Generator().manual_seed(seed)
    boost = tok.encode(favour, add_special_tokens=False)
    for step in range(steps):
        logits = torch.randn(len(vocab.texts), generator=gen)
        logits[boost[min(step, len(boost) - 1)]] += 8.0
        ids.append(int(guard(ids, logits).argmax()))
        if vocab.decode(ids).rstrip().endswith(END_QUOTE):
            break
    return vocab.decode(ids)


@pytest.mark.parametrize("favour", ["Invitation links last 7 days", "Links expire in 3 days",
                                    "The limit is 100 requests"])
def test_quotes_stay_spans_of_the_sources_whatever_the_model_prefers(vocab, favour):
    guard = QuoteGuard(vocab, SOURCES)
    text = _greedy(vocab, guard, f"They last {BEGIN_QUOTE}", favour, steps=60)
    parsed = parse_answer(text)
    assert END_QUOTE in text, text
    assert parsed.quotes and all(quote_found(q, SOURCES) for q in parsed.quotes), text
    assert guard.steps_guarded > 0


def test_a_quote_the_sources_hold_is_left_as_the_model_writes_it(vocab):
    guard = QuoteGuard(vocab, SOURCES)
    text = _greedy(vocab, guard, BEGIN_QUOTE, f"Invitation links expire after 72 hours.{END_QUOTE}",
                   steps=40)
    assert parse_answer(text).quotes == ["Invitation links expire after 72 hours."], text


def test_outside_quotes_and_without_sources_nothing_changes(vocab):
    logits = torch.randn(len(vocab.texts))
    tok = vocab.tokenizer
    for start in ("The links last", f"{BEGIN_QUOTE}72 hours{END_QUOTE} so"):
        ids = tok.encode(start, add_special_tokens=False)
        assert QuoteGuard(vocab, SOURCES)(ids, logits) is logits
    inside = tok.encode(f"x {BEGIN_QUOTE}Inv", add_special_tokens=False)
    assert QuoteGuard(vocab, [])(inside, logits) is logits
    assert QuoteGuard(vocab, ["  "])(inside, logits) is logits


def test_whitespace_cannot_run_on_and_empty_quotes_cannot_close(vocab):
    guard = QuoteGuard(vocab, SOURCES)
    assert not guard.allows("7", " ")  # "7" is not followed by a space in the sources
    assert not guard.allows("7", " days")
    assert guard.allows("72", "  ")
    assert guard.allows("72", " hours")
    assert not guard.allows("72 ", " ")
    assert not guard.allows("", END_QUOTE[:2])  # an empty quote may not close
    assert not guard.allows("7", END_QUOTE[:2])  # nor one shorter than a word
    assert guard.allows("72 hours", END_QUOTE[:2])
    assert not guard.allows("72 hours", "###")  # "###" is not the closing marker


def test_open_quote_reads_where_the_output_stands():
    assert open_quote("no quote yet") is None
    assert open_quote(f"a {BEGIN_QUOTE}72 ho") == ("72 ho", None)
    assert open_quote(f"a {BEGIN_QUOTE}72 hours##end_q") == ("72 hours", "##end_q")
    assert open_quote(f"a {BEGIN_QUOTE}72 hours{END_QUOTE}\n<ANSWER>: 72") is None


def test_when_no_likely_token_fits_the_sources_say_what_may_follow(vocab):
    guard = QuoteGuard(vocab, SOURCES)
    tok = vocab.tokenizer

    def first(text: str) -> int:
        return tok.encode(text, add_special_tokens=False)[0]

    assert first(" expire") in guard.continuations("Invitation links")
    assert first("expire") in guard.continuations("Invitation links ")
    opening = guard.continuations("")  # an empty quote may open any sentence
    assert {first("Pricing"), first("Invitations"), first("Admins")} <= set(opening)
    # Every token but a wrong one is far behind: the guard still continues from the sources.
    logits = torch.full((len(vocab.texts),), -1e4)
    logits[first(" last")] = 10.0
    ids = tok.encode(f"{BEGIN_QUOTE}Invitation links", add_special_tokens=False)
    chosen = int(guard(ids, logits).argmax())
    assert quote_found("Invitation links" + vocab.texts[chosen], SOURCES)
