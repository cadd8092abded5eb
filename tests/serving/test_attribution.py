"""Every answer shows its evidence: quotes tied to chunks, unquoted answers attributed to the
retrieved sentence that states them, and answers nothing supports flagged ``ungrounded`` (and
declined in support mode). Unit tests on hand-made hits, then the API on a scripted engine."""

from __future__ import annotations

import json
from collections.abc import Sequence

import httpx
import pytest

from docent.engine import ChatRequest, Completion, Engine
from docent.prompts import DECLINE_ANSWER
from retrieval import Hit
from serving.attribution import attribute, echoes, supports
from serving.rag import UNSUPPORTED, declines_ungrounded, ground

from conftest import free_port, serve_in_thread, sse_events, write_corpus

INVITES = (
    "# Inviting your team\n\nInvitation links to a workspace are valid for 72 hours, after "
    "which the person must be invited again. You can invite up to 25 people in one batch."
)
REFUNDS = (
    "# Refunds\n\nRefunds are paid back to the original card within 5 business days. "
    "The CEO approves refunds above 10,000 EUR."
)
SENTENCE_72 = (
    "Invitation links to a workspace are valid for 72 hours, after which the person must be "
    "invited again."
)


def _hit(n: int, text: str, source: str = "a.md") -> Hit:
    return Hit(f"c{n}", n, 1.0 / n, text, source, None, "Sec", None, "default")


HITS = [_hit(1, REFUNDS, "billing.md"), _hit(2, INVITES, "getting-started.md")]
INVITE_Q = "How long is an invitation link valid?"


# The rule, on hand-made hits ---------------------------------------------------------------
def test_a_short_unquoted_answer_is_attributed_to_the_sentence_that_states_it():
    evidence = ground(INVITE_Q, "72 hours", False, [], HITS)
    assert not evidence.ungrounded
    [citation] = evidence.citations
    assert citation.kind == "attributed"
    assert citation.quote == SENTENCE_72
    assert (citation.document, citation.chunk_id) == (2, "c2")
    assert citation.source == "getting-started.md"


def test_an_answer_no_sentence_states_is_ungrounded():
    evidence = ground(INVITE_Q, "7 days", False, [], HITS)  # the handbook says 72 hours
    assert evidence.ungrounded and evidence.citations == []
    assert ground(INVITE_Q, "7", False, [], HITS).ungrounded  # "7" is not in "72"


def test_a_decline_is_never_ungrounded():
    evidence = ground(INVITE_Q, DECLINE_ANSWER, True, [], HITS)
    assert not evidence.ungrounded and evidence.citations == []


def test_a_quote_that_states_the_answer_is_its_citation():
    evidence = ground(INVITE_Q, "72 hours", False, ["valid for 72 hours"], HITS)
    assert [(c.kind, c.quote, c.chunk_id) for c in evidence.citations] == [
        ("quote", "valid for 72 hours", "c2")
    ]
    assert not evidence.ungrounded


def test_quotes_that_do_not_state_the_answer_get_an_attributed_sentence_beside_them():
    quote = "Refunds are paid back to the original card"
    evidence = ground(INVITE_Q, "72 hours", False, [quote, "Invented text."], HITS)
    assert [c.kind for c in evidence.citations] == ["quote", "attributed"]
    assert evidence.citations[1].quote == SENTENCE_72
    assert evidence.unsupported_quotes == ["Invented text."]
    # Real quotes, but none states "7 days" and no sentence does: still ungrounded.
    assert ground(INVITE_Q, "7 days", False, [quote], HITS).ungrounded


def test_long_answers_are_judged_by_their_content_words_and_numbers():
    assert supports(SENTENCE_72, "Invitation links are valid for 72 hours once sent")
    assert not supports(SENTENCE_72, "Invitation links are valid for 7 days once sent")
    assert not supports(SENTENCE_72, "Invitation links are valid until the admin removes them")
    assert supports("Refunds are paid back within 5 business days.", "5 business days")


def test_a_short_answer_must_come_from_a_sentence_about_the_question():
    # "CEO" is in a retrieved sentence, but one about refunds, not about data protection.
    assert attribute("CEO", HITS, "Who is the data-protection officer?") is None
    found = attribute("the CEO", HITS, "Who approves large refunds?")
    assert found is not None and found.document == 0 and found.sentence.startswith("The CEO")


def test_a_quote_about_something_else_does_not_ground_a_short_answer():
    # The quote is in a retrieved chunk and holds "5 business days", but it is about refunds:
    # a model must not ground an answer about invitations by quoting it.
    refund = "Refunds are paid back to the original card within 5 business days."
    evidence = ground(INVITE_Q, "5 business days", False, [refund], HITS)
    assert evidence.ungrounded and [c.kind for c in evidence.citations] == ["quote"]
    # The same quote grounds the same answer to the question it is about.
    assert not ground("When are refunds paid back?", "5 business days", False, [refund],
                      HITS).ungrounded


def test_an_answer_that_only_echoes_the_question_is_ungrounded():
    # Run 5's answer to a question the handbook cannot answer, "grounded" by quoting the API
    # sentence: it names nothing the question did not.
    api = "The Quillfeather REST API lets you automate your workspace."
    hits = [_hit(1, api)]
    question = "Which programming languages have an official Quillfeather API SDK?"
    assert echoes("Quillfeather API", question)
    assert ground(question, "Quillfeather API", False, [api], hits).ungrounded
    # A yes/no answer states its polarity, a pick states the alternative picked.
    assert not echoes("does not count", "Does version history count towards the quota?")
    assert not echoes("Team plan", "Is the Pro plan or the Team plan cheaper?")
    assert not echoes("REST API", "Which Quillfeather API SDK is official?")


def test_whitespace_of_the_chunk_is_kept_so_pages_can_highlight_the_sentence():
    hit = _hit(1, "Links are valid  for\t72 hours.")
    found = attribute("72 hours", [hit], "How long are links valid?")
    assert found is not None and found.sentence == "Links are valid  for\t72 hours."


@pytest.mark.parametrize(
    ("setting", "mode", "tuned", "declines"),
    [
        ("support", "support", False, True),
        ("support", None, False, False),
        ("support", None, True, False),
        ("support", "tutor", False, False),
        ("tuned", None, True, True),  # an adapter's ungrounded answer: declined everywhere
        ("tuned", "tutor", True, True),
        ("tuned", None, False, False),  # the base model's: only flagged outside support
        ("tuned", "support", False, True),
        ("always", None, False, True),
        ("never", "support", True, False),
    ],
)
def test_the_decline_setting_by_mode_and_model(setting, mode, tuned, declines):
    assert declines_ungrounded(setting, mode, tuned) is declines


def test_a_bad_decline_setting_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="never, support, tuned or always"):
        declines_ungrounded("sometimes", None)


# The API, on a scripted engine --------------------------------------------------------------
MANY_Q = "How many people can I invite in one batch?"
REFUND_Q = "How long do refunds take to reach the card?"
REPLIES = {
    INVITE_Q: "Invitation links last a week.\n<ANSWER>: 7 days",  # wrong, and quotes nothing
    MANY_Q: "You can invite up to 25 people.",  # no quote, no answer line, but true
    REFUND_Q: (
        "##begin_quote##Refunds are paid back to the original card within 5 business days."
        "##end_quote##\n<ANSWER>: within 5 business days"
    ),
}


class ScriptedEngine(Engine):
    """Replies to each question with its scripted RAFT output."""

    kind, model = "scripted", "scripted"

    def generate(
        self, requests: Sequence[ChatRequest], progress: object = None
    ) -> list[Completion]:
        asked = [r.messages[-1]["content"].rsplit("Question: ", 1)[-1] for r in requests]
        return [Completion(REPLIES[q], 50, 10, "stop", self.model, r.adapter)
                for q, r in zip(asked, requests, strict=True)]

    def add_adapter(self, name: str, path: str) -> None:
        pass  # the scripted replies stand for the adapter's too


def _serve(tmp_path_factory, embedder, adapter: str | None = None, **settings: object):
    """The API on the scripted engine; with ``adapter``, one is registered and promoted (its
    replies are the scripted ones: what matters is that an adapter answers)."""
    from docent.models import generator_id
    from docent.settings import DocentSettings
    from ingest.pipeline import refresh_index
    from raft.adapters import METADATA, AdapterRegistry
    from serving.app import create_app

    root = tmp_path_factory.mktemp("attribution")
    corpus = write_corpus(root / "corpus", {"invites.md": INVITES, "refunds.md": REFUNDS})
    port = free_port()
    config = DocentSettings(workspace=root / "ws", port=port, top_k=2, **settings)
    refresh_index([corpus], config, embedder=embedder)
    if adapter:
        folder = root / "ws" / "adapters" / adapter
        folder.mkdir(parents=True)
        meta = {"name": adapter, "base_model": generator_id(config.generator)}
        (folder / METADATA).write_text(json.dumps(meta))
        AdapterRegistry(folder.parent).promote(adapter, config.generator)
    return serve_in_thread(create_app(config, engine=ScriptedEngine(), embedder=embedder), port)


@pytest.fixture(scope="module")
def api(tmp_path_factory, embedder):
    with _serve(tmp_path_factory, embedder) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


def test_ask_flags_an_unsupported_answer_and_still_returns_it(api):
    body = api.post("/v1/ask", json={"question": INVITE_Q}).json()
    assert body["answer"] == "7 days"
    assert body["ungrounded"] is True and body["declined"] is False
    assert body["grounded"] is False and body["citations"] == []


def test_support_mode_declines_the_unsupported_answer(api):
    body = api.post("/v1/chat", json={"message": INVITE_Q, "mode": "support"}).json()
    assert body["declined"] is True and body["ungrounded"] is True
    assert body["answer"] == DECLINE_ANSWER and body["reasoning"] == UNSUPPORTED
    tutor = api.post("/v1/chat", json={"message": INVITE_Q, "mode": "tutor"}).json()
    assert tutor["answer"] == "7 days" and tutor["ungrounded"] is True


def test_unquoted_answers_get_an_attributed_citation_and_quotes_a_quoted_one(api):
    many = api.post("/v1/ask", json={"question": MANY_Q}).json()
    assert many["ungrounded"] is False and many["grounded"] is True
    [attributed] = many["citations"]
    assert attributed["kind"] == "attributed" and attributed["source"] == "invites.md"
    assert attributed["quote"] == "You can invite up to 25 people in one batch."
    assert many["chunks"][attributed["document"] - 1]["chunk_id"] == attributed["chunk_id"]

    refund = api.post("/v1/ask", json={"question": REFUND_Q, "stream": True})
    final = sse_events(refund.text)[-1][1]
    assert [c["kind"] for c in final["citations"]] == ["quote"]
    assert final["answer"] == "within 5 business days" and final["ungrounded"] is False


def test_openai_chat_carries_the_flag_and_never_streams_a_withheld_answer(api):
    body = {"model": "docent", "messages": [{"role": "user", "content": INVITE_Q}]}
    plain = api.post("/v1/chat/completions", json=body).json()
    assert plain["docent"]["ungrounded"] is True and plain["docent"]["declined"] is False
    content = plain["choices"][0]["message"]["content"]
    assert content.startswith("7 days") and "none of the retrieved documents" in content

    support = {**body, "stream": True, "docent": {"mode": "support"}}
    r = api.post("/v1/chat/completions", json=support)
    chunks = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == DECLINE_ANSWER and "7 days" not in streamed
    assert chunks[-1]["docent"]["declined"] is True and chunks[-1]["docent"]["ungrounded"] is True


def test_never_only_flags_even_in_support_mode(tmp_path_factory, embedder):
    with _serve(tmp_path_factory, embedder, decline_ungrounded="never") as url:
        body = httpx.post(
            f"{url}/v1/chat", json={"message": INVITE_Q, "mode": "support"}, timeout=60
        ).json()
    assert body["answer"] == "7 days" and body["ungrounded"] is True and not body["declined"]


def test_a_tuned_adapter_s_ungrounded_answer_is_declined_by_default(tmp_path_factory, embedder):
    with _serve(tmp_path_factory, embedder, adapter="raft-1") as url, \
            httpx.Client(base_url=url, timeout=60) as api:
        tuned = api.post("/v1/ask", json={"question": INVITE_Q}).json()
        assert tuned["adapter"] == "raft-1"
        assert tuned["declined"] is True and tuned["ungrounded"] is True
        assert tuned["answer"] == DECLINE_ANSWER and tuned["reasoning"] == UNSUPPORTED
        # A grounded answer of the adapter stands.
        many = api.post("/v1/ask", json={"question": MANY_Q}).json()
        assert many["declined"] is False and many["answer"].startswith("You can invite up to 25")
        # The base model's ungrounded answer to a plain question is only flagged.
        base = api.post("/v1/ask", json={"question": INVITE_Q, "adapter": "base"}).json()
        assert base["adapter"] is None and base["answer"] == "7 days" and not base["declined"]
        # Streamed through the OpenAI API, the adapter's withheld answer never shows.
        r = api.post("/v1/chat/completions", json={
            "model": "docent", "stream": True,
            "messages": [{"role": "user", "content": INVITE_Q}],
        })
        chunks = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
        streamed = "".join(
            c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]
        )
        assert streamed == DECLINE_ANSWER and "7 days" not in streamed
